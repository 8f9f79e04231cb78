"""The one exception type that reaches the user as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input (recipe, data, paths, flags): the message says what, where and how to fix it."""


class RunInterrupted(Exception):
    """A stage stopped at a step boundary on SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, step: int, checkpoint: str, signal_name: str):
        super().__init__(f"interrupted by {signal_name} at step {step}; checkpoint saved to {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint
        self.signal_name = signal_name
