"""The export stage's error, in its own module so the stage's modules share it without importing
the package that imports them."""


class ExportError(RuntimeError):
    """A run that cannot be exported; the message says which file and what to do."""
