"""OFB, the default method: its recipe section (config.py), its search loop (engine.py) and latency loss."""
