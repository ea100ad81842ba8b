"""The functional core: keys, the train state, the per-device steps, metrics,
losses and optimizers. Nothing here touches files or the host loop."""
