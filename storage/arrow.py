"""Stored objects as Arrow files: ranged reads through the Store, so pyarrow reads only what it needs
(a Parquet footer, some columns) from S3 with boto3 and no second S3 library."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.store import Store


class StoreFile(io.RawIOBase):
    """A read-only, seekable file over one stored object."""

    def __init__(self, store: Store, key: str, size: int):
        self.store, self.key, self.size, self.pos = store, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer) -> int:
        end = min(self.size, self.pos + len(buffer))
        data = self.store.get_range(self.key, self.pos, end)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        data = self.store.get_range(self.key, self.pos, self.size)
        self.pos = self.size
        return data


def open_arrow_file(store: Store, key: str, size: int) -> pa.PythonFile:
    return pa.PythonFile(StoreFile(store, key, size), mode="r")


def parquet_footer(store: Store, key: str, size: int) -> pq.FileMetaData:
    """A stored Parquet file's footer (row count, key-value metadata), read alone; raises if the file
    is truncated or corrupt."""
    return pq.read_metadata(open_arrow_file(store, key, size))


class StoreFileSystem(pafs.FileSystemHandler):
    """A read-only pyarrow filesystem over a Store, for ``pyarrow.dataset`` (lazy, column-pruned reads)."""

    def __init__(self, store: Store):
        self.store = store
        self._sizes: dict[str, int] = {}

    def get_type_name(self) -> str:
        return "induction-sweep-store"

    def equals(self, other) -> bool:
        return isinstance(other, StoreFileSystem) and other.store.uri == self.store.uri

    def _size(self, path: str) -> int:
        if path not in self._sizes:
            self._sizes.update(self.store.list(path))
        return self._sizes[path]

    def get_file_info(self, paths):
        infos = []
        for path in paths:
            listing = self.store.list(path)
            if path in listing:
                self._sizes[path] = listing[path]
                infos.append(pafs.FileInfo(path, pafs.FileType.File, size=listing[path]))
            elif listing:
                infos.append(pafs.FileInfo(path, pafs.FileType.Directory))
            else:
                infos.append(pafs.FileInfo(path, pafs.FileType.NotFound))
        return infos

    def get_file_info_selector(self, selector):
        listing = self.store.list(selector.base_dir.rstrip("/") + "/")
        self._sizes.update(listing)
        return [pafs.FileInfo(k, pafs.FileType.File, size=v) for k, v in sorted(listing.items())]

    def open_input_file(self, path: str):
        return open_arrow_file(self.store, path, self._size(path))

    def open_input_stream(self, path: str):
        return self.open_input_file(path)

    def normalize_path(self, path: str) -> str:
        return path

    def _read_only(self, *args, **kwargs):
        raise OSError("this filesystem is read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


def filesystem(store: Store) -> pafs.PyFileSystem:
    return pafs.PyFileSystem(StoreFileSystem(store))
