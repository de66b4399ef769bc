"""Latency lookup tables of the target device, and the differentiable latency the search uses."""
