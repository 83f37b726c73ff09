"""One interface over a local directory and an S3 prefix: atomic put, get, ranged get, list, delete.

Keys are relative, ``/``-separated paths under the store's root (``shards/neighbors/part-000000.parquet``).
A put is atomic: a local write goes to a temporary file outside the visible tree and is renamed
into place; an S3 write is one PUT. S3 goes through boto3 with its standard credential chain,
``AWS_ENDPOINT_URL`` for S3-compatible stores, and botocore's standard retry mode (exponential
backoff with jitter on throttling, 5xx and connection errors).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

# Non-secret S3 settings that a run forwards to its actors and jobs (credentials never travel).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
                 "INDUCTION_SWEEP_S3_ATTEMPTS")
TMP_DIR = ".tmp"  # local in-flight writes; never under a listed prefix
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StorageInputError(ValueError):
    """A URI, bucket or credential that cannot work: bad input, reported before any work (exit 2)."""


class StorageError(RuntimeError):
    """Storage failed during a run, after retries (exit 1; rerunning resumes)."""


def open_store(uri: str) -> Store:
    uri = str(uri)
    if re.match(r"[sS]3:(?!//)", uri) or uri.startswith("S3://"):  # s3:/bucket, s3:bucket, S3://: never a local path
        raise StorageInputError(f"malformed S3 URI {uri!r}: write s3://bucket/prefix")
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket):
            raise StorageInputError(f"malformed S3 URI {uri!r}: expected s3://bucket/prefix with a valid bucket name")
        return S3Store(bucket, prefix.strip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri or not uri.strip():
        raise StorageInputError(f"unsupported URI {uri!r}: use a local path or s3://bucket/prefix")
    return LocalStore(Path(uri).expanduser())


class Store:
    uri: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def get_range(self, key: str, start: int, end: int) -> bytes: ...
    def list(self, prefix: str = "") -> dict[str, int]:
        """{key: size} of every object under ``prefix``."""
        ...
    def entries(self, prefix: str = "") -> dict[str, tuple[int, str | None]]:
        """{key: (size, ETag)} of every object under ``prefix`` (ETag None where the store keeps none)."""
        return {key: (size, None) for key, size in self.list(prefix).items()}

    def delete_prefix(self, prefix: str) -> None: ...
    def check(self) -> None:
        """Raise StorageInputError if the store cannot be written (missing bucket, credentials)."""

    def exists(self, key: str) -> bool:
        return key in self.list(key)

    def join(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"


class LocalStore(Store):
    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        tmp = self.root / TMP_DIR / f"{uuid.uuid4().hex}.part"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._path(key).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, self._path(key))

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def get_range(self, key: str, start: int, end: int) -> bytes:
        with open(self._path(key), "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def list(self, prefix: str = "") -> dict[str, int]:
        base = self._path(prefix)
        if base.is_file():
            return {prefix: base.stat().st_size}
        if not base.is_dir():
            return {}
        found = {}
        for path in base.rglob("*"):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and not rel.startswith(TMP_DIR + "/"):
                found[rel] = path.stat().st_size
        return found

    def delete_prefix(self, prefix: str) -> None:
        target = self._path(prefix)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    def check(self) -> None:
        check_directory(self.root, "cannot write under")


KEY_ROOM = 128  # the longest key a run writes under its root (shards/<experiment>/part-NNNNNN.parquet, .tmp/<uuid>.part)


def check_directory(root: Path, doing: str) -> None:
    """StorageInputError unless ``root`` is, or can be made, a writable directory whose files' paths
    (``KEY_ROOM`` characters more) the file system takes: no component over its name limit, the
    whole within its path limit, no file where a directory is needed."""
    name_max, path_max = 255, 4096
    try:
        name_max, path_max = os.pathconf("/", "PC_NAME_MAX"), os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):
        pass
    long = next((part for part in root.parts if len(part.encode()) > name_max), None)
    if long is not None:
        raise StorageInputError(f"{doing} {str(root)[:80]}…: a path component of {len(long.encode())} bytes "
                                f"(the file system takes at most {name_max})")
    if len(str(root.absolute()).encode()) + KEY_ROOM > path_max:
        raise StorageInputError(f"{doing} {str(root)[:80]}…: the path is {len(str(root.absolute()).encode())} bytes; "
                                f"its files need {KEY_ROOM} more, within the file system's {path_max}")
    probe = root.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise StorageInputError(f"{doing} {root}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageInputError(f"{doing} {root}: {probe} is not writable")


def s3_client():
    """A boto3 S3 client: standard credential chain, AWS_ENDPOINT_URL honoured, retries with backoff.

    AWS_MAX_ATTEMPTS and AWS_RETRY_MODE (or the AWS config file's max_attempts and retry_mode) are
    honoured as by the AWS tools; where neither is set, a long run's default: standard mode, 10
    attempts (INDUCTION_SWEEP_S3_ATTEMPTS)."""
    import boto3
    import botocore.session
    from botocore.config import Config

    core = botocore.session.get_session()  # a fresh credential lookup

    def user_set(name: str) -> bool:
        return core.get_config_variable(name, methods=("env", "config")) is not None

    retries = {}  # keys left out are read by botocore from the environment and the config file
    if not user_set("retry_mode"):
        retries["mode"] = "standard"
    if not user_set("max_attempts"):
        retries["total_max_attempts"] = int(os.environ.get("INDUCTION_SWEEP_S3_ATTEMPTS", "10"))
    config = Config(retries=retries, connect_timeout=5, read_timeout=60)
    return boto3.session.Session(botocore_session=core).client("s3", config=config)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, method: str, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.uri}: {kwargs.get('Key', '')} not found") from None
            if code == "NoSuchBucket":  # a rerun cannot help: bad input wherever it is met
                raise StorageInputError(f"bucket {self.bucket!r} does not exist") from None
            raise StorageError(f"S3 {method} on {self.uri} failed: {code or exc}") from None
        except BotoCoreError as exc:
            raise StorageError(f"S3 {method} on {self.uri} failed after retries: {exc}") from None

    def put(self, key: str, data: bytes) -> None:
        self._call("put_object", Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        return self._call("get_object", Key=self._key(key))["Body"].read()

    def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return self._call("get_object", Key=self._key(key), Range=f"bytes={start}-{end - 1}")["Body"].read()

    def list(self, prefix: str = "") -> dict[str, int]:
        return {key: size for key, (size, _) in self.entries(prefix).items()}

    def entries(self, prefix: str = "") -> dict[str, tuple[int, str | None]]:
        full = self._key(prefix)
        base = len(self.prefix) + 1 if self.prefix else 0
        found, token = {}, None
        while True:
            kwargs = {"Prefix": full, **({"ContinuationToken": token} if token else {})}
            page = self._call("list_objects_v2", **kwargs)
            for obj in page.get("Contents", []):
                found[obj["Key"][base:]] = (obj["Size"], obj.get("ETag", "").strip('"') or None)
            if not page.get("IsTruncated"):
                return found
            token = page["NextContinuationToken"]

    def delete_prefix(self, prefix: str) -> None:
        keys = list(self.list(prefix))
        for i in range(0, len(keys), 1000):
            objects = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            self._call("delete_objects", Delete={"Objects": objects, "Quiet": True})

    def check(self) -> None:
        from botocore.exceptions import ClientError, NoCredentialsError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StorageInputError(f"no AWS credentials found for {self.uri} (boto3's standard chain)") from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise StorageInputError(f"bucket {self.bucket!r} does not exist") from None
            if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                raise StorageInputError(f"access to bucket {self.bucket!r} denied: check the AWS credentials") from None
            raise StorageInputError(f"cannot use {self.uri}: {code}") from None
        except Exception as exc:  # endpoint unreachable after retries
            raise StorageInputError(f"cannot reach S3 for {self.uri}: {str(exc).splitlines()[0][:200]}") from None
