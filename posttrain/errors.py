"""The one exception type the `posttrain` command reports as a plain message instead of a traceback."""


class PosttrainError(Exception):
    """A problem with the recipe, its inputs or the run directory, explained for the user."""
