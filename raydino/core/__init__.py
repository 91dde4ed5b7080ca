"""DINO itself: model, loss, schedules, the step and the loop, checkpoints and weights. No Ray, no I/O beyond checkpoint files."""
