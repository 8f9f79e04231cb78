"""Training machinery: the session every weight-updating stage runs in, the gradient loop on it,
checkpoints, optimizers and schedules, and summary.json."""
