"""Runnable recipes: ``uv run python -m experiments.NAME --help``."""
