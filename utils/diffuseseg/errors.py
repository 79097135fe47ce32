"""User-facing errors: scripts print these as one line, without a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data, checkpoint), explained by its message."""


class DataError(UserError):
    """A data file or folder is missing, unreadable or inconsistent."""
