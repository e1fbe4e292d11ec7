"""Training: config, presets, run directory, checkpoints, optimiser, the loop, evaluation."""
