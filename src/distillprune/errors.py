"""The one exception type that the command line turns into a single-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: a recipe, a key, a file, a model name. The message says what to change."""
