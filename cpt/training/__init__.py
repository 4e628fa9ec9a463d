"""Training: the loop, LR schedules and resumable checkpoints."""
