"""Sampling engine: the VideoSampler (sampler.py) and the EMA weights it samples with (weights.py)."""
