"""The training run: the step's stages (driver), rollouts, checkpoints, metrics and what a run prints."""
