"""The one exception type for user mistakes: bad files, bad data, bad options.

The CLI turns a :class:`TrojanscanError` into a one-line message and a non-zero exit; anything
else is a bug in trojanscan and keeps its traceback.
"""


class TrojanscanError(ValueError):
    """A problem with the user's input, with a message that names the file or option and the fix."""


class TrojanscanWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI shows it in one line)."""
