"""The one exception type for problems a user can cause and fix."""


class MinibloomError(Exception):
    """Raised for bad input: the message names the cause, the file or key, and the remedy.

    The CLI prints the message (no traceback) and exits with status 2.
    """
