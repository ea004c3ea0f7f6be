"""The training loop and what it uses: config, objectives, optimizers, precision, state, checkpoints,
validation, cached encodings, distributed runs."""
