"""The one error type every layer raises for problems a user can fix.

The CLI prints it as one line (no stack trace) and exits 1; the HTTP API maps it to 400.
It lives in the bottom layer so that every layer can raise it.
"""


class UserError(RuntimeError):
    """A clear, one-line problem: wrong endpoint, missing bucket, bad image, ..."""
