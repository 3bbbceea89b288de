"""The one exception type a user sees: its message is a single line that says what to do."""


class EmbedkitError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits non-zero, no traceback.

    Messages name files, columns and models, never patient text.
    """

    exit_code = 2
