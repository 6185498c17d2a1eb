"""The config: configs/*.py loaded, and checked once against configs/default.py (the schema)."""
