"""A run directory: the run around ``fit`` (resume, signals), Orbax checkpoints,
metrics and TensorBoard logs, config.json, and curves."""
