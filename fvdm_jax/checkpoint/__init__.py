"""Checkpoints: the orbax training checkpoints, their fingerprints, inference checkpoints, and
the recipe check (which config sections define the weights)."""
