"""The error of data that cannot be used at all (a missing path, an unknown source): a leaf
module, so that every data module can raise it without importing another."""


class DataError(ValueError):
    """A dataset cannot be used at all: missing path, unknown source, unreadable index file."""
