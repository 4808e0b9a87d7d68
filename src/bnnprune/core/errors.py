"""The base of the errors a user can fix (a bad param, file, model or environment)."""


class UserError(Exception):
    """A bad input the user can fix: stage scripts and the `bnnprune` command print it as one
    `error:` line and exit with status 2, not a traceback."""
