"""Object storage: one interface over local directories and s3:// prefixes (see storage/store.py)."""

from storage.store import LocalStore, S3Store, StorageError, StorageInputError, Store, open_store

__all__ = ["LocalStore", "S3Store", "Store", "StorageError", "StorageInputError", "open_store"]
