"""The one exception type that the CLI turns into a single line and exit code 2."""


class UserError(Exception):
    """Bad input the user can fix: the message names the file or key and what to do."""
