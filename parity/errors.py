"""Errors that mean "bad input": the CLI prints `error: <message>` and exits 2."""


class ParityError(Exception):
    """Bad input, usage error, or a file that cannot be used. The message names the file."""


class CheckpointError(ParityError):
    """A checkpoint directory that cannot be read or does not match its config."""
