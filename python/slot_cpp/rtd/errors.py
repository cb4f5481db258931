"""The errors of RTD datastores."""


class DatastoreError(ValueError):
    """A datastore file or datastore argument is unusable."""


class DatastoreMismatchError(DatastoreError):
    """The datastore was built with another model."""
