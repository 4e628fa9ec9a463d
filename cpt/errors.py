"""User-facing errors.

A `CptError` is something the user caused (a bad config key, a missing file, a run directory
that already holds another run). The CLI prints its message on one line and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class CptError(Exception):
    """An error the user can fix; the message names the file or field and what to do."""
