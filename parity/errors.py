"""Errors that mean "bad input": the CLI prints `error: <message>` and exits 2."""


class ParityError(Exception):
    """Bad input, usage error, or a file that cannot be used. The message names the file."""


class CheckpointError(ParityError):
    """A checkpoint directory that cannot be read or does not match its config."""


class StructureError(CheckpointError):
    """A readable checkpoint whose weights do not match its config (missing, unexpected or
    mis-shaped tensors, a stored head that a tied config would ignore): the gate reports it as a
    structure failure (exit 1, report written); other commands refuse it (exit 2)."""


class TokenizerMissing(ParityError):
    """The checkpoint has no tokenizer files (a check that needs them is skipped, not failed)."""


class InputError(ParityError, ValueError):
    """Model input that is not what was expected (text where ids were expected, ids that are not
    integers, rows that cannot be made into a batch): the message says what is accepted. A
    ValueError too, so `except ValueError` in a user's notebook still catches it."""
