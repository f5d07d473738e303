"""The error raised for checkpoints that cannot be read (a ValueError: the CLI prints it as one line)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: bad path, malformed config, missing / unexpected / mis-shaped tensors."""
