"""Latency lookup tables of the target device (the search's differentiable latency is prune/ofb/objective.py)."""
