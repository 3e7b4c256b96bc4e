"""The one error type of data preparation."""


class DataError(ValueError):
    """Data that cannot be used. The message names the file and line (or the record) and what to do."""
