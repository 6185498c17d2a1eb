"""Experiments that train and evaluate several models in one command (see docs/experiments.md)."""
