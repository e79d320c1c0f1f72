"""The one error type users see: a one-line message naming the input and what is wrong.

The CLI catches `UserInputError`, prints `error: <message>` and exits with status 2.
"""


class UserInputError(Exception):
    """Bad input from the user (a file, a flag, a config value). Exit code 2."""

    exit_code = 2
