"""The kinds of failure the main job reports in one line instead of a traceback."""


class UsageError(ValueError):
    """A bad flag or SOURCE: the command exits with status 2."""


class SourceError(Exception):
    """One source cannot be opened or read; its session stops, the others keep running."""


class StoreError(Exception):
    """The session store (``--redis``) could not be reached or failed before anything ran:
    the command exits with status 1."""
