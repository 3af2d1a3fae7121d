"""The base of every error nanoseek reports to a user: bad config, checkpoint, data, request or flags.

The CLI prints these as one line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class NanoseekError(ValueError):
    """Input nanoseek cannot use; the message names what is wrong (a file, tensor, field or flag)."""
