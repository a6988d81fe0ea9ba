"""Content-addressed artifact store.

Every object is keyed by the sha256 of its bytes and verified on every read, so a
tampered or truncated object is refused instead of silently used; a materialised copy of a
directory is checked against its tree's digests every time it is used. Writing an object
that is already there checks the stored bytes and replaces them if they are corrupt, so
running the step that produced an object again repairs it. Writes are atomic
(temporary file + rename): a reader never sees a partial object, and a writer killed
mid-way leaves only a temporary file that no key points to.
On S3 (`S3Store`, s3://bucket/prefix) an object becomes visible only once its (multipart)
upload completes, so the same holds there.

Directories (model checkpoints, tokenizers) are stored as a *tree*: a JSON manifest
listing each file's relative path, size and digest; the tree's digest is the digest of
that manifest, so a model is addressed by one sha256.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEX = set("0123456789abcdef")


class IntegrityError(RuntimeError):
    """An object's bytes do not match the digest it is stored under."""


REPAIR_HINT = (
    "Run `flminillm store verify --repair --config <your config>` to drop it (and the cached "
    "steps that produced it), then run again"
)


class ObjectNotFound(FileNotFoundError):
    pass


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_digest(digest: str) -> str:
    if len(digest) != 64 or not set(digest) <= HEX:
        raise ValueError(f"not a sha256 hex digest: {digest!r}")
    return digest


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either nothing or all of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class Store:
    """Base class: subclasses provide raw `_read/_write/_exists` on keys."""

    uri: str

    # raw primitives -------------------------------------------------------------------
    def _read(self, key: str) -> bytes:
        raise NotImplementedError

    def _write(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def _exists(self, key: str) -> bool:
        raise NotImplementedError

    def _delete(self, key: str) -> None:
        raise NotImplementedError

    def object_uri(self, digest: str) -> str:
        raise NotImplementedError

    def _key(self, digest: str) -> str:
        return f"{self.scope_prefix}objects/sha256/{digest[:2]}/{digest}"

    scope_prefix: str = ""

    def scoped(self, scope: str) -> Store:
        """A view of this store whose objects live under `parties/<scope>/` (one prefix per
        party: its models and private data; "public" and "exchange" for shared objects).
        Records (the ledger) stay shared."""
        if not scope.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"bad store scope {scope!r}")
        view = copy.copy(self)
        view.scope_prefix = f"parties/{scope}/"
        return view

    # verified blob API ----------------------------------------------------------------
    def put_bytes(self, data: bytes) -> str:
        """Store `data` under its sha256. An object already there is kept if its bytes are
        intact and replaced if they are not (a producer run again repairs its outputs)."""
        digest = sha256_bytes(data)
        key = self._key(digest)
        if self._exists(key):
            if sha256_bytes(self._read(key)) == digest:
                return digest
            print(f"store: replacing corrupt object {self.object_uri(digest)}", file=sys.stderr)
        self._write(key, data)
        return digest

    def get_bytes(self, digest: str) -> bytes:
        key = self._key(_check_digest(digest))
        if not self._exists(key):
            raise ObjectNotFound(f"object sha256:{digest} not found in store {self.uri}")
        data = self._read(key)
        actual = sha256_bytes(data)
        if actual != digest:
            raise IntegrityError(
                f"object {self.object_uri(digest)} is corrupt: its sha256 is {actual} "
                f"({len(data)} bytes); refusing to use it. {REPAIR_HINT}."
            )
        return data

    def exists(self, digest: str) -> bool:
        return self._exists(self._key(_check_digest(digest)))

    # named, mutable records (the step ledger) ------------------------------------------
    def _list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def put_record(self, name: str, obj: Any) -> None:
        """Write a small JSON record under `records/<name>` (atomic; later writes replace it)."""
        self._write(f"records/{name}", json.dumps(obj, sort_keys=True, indent=1).encode())

    def list_records(self, prefix: str) -> list[Any]:
        return [json.loads(self._read(k)) for k in sorted(self._list(f"records/{prefix}"))]

    # structured helpers ---------------------------------------------------------------
    def put_json(self, obj: Any) -> str:
        return self.put_bytes(json.dumps(obj, sort_keys=True, indent=1).encode())

    def get_json(self, digest: str) -> Any:
        return json.loads(self.get_bytes(digest))

    def put_tensors(self, tensors: dict, metadata: dict[str, str] | None = None) -> str:
        from safetensors.torch import save

        return self.put_bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata))

    def get_tensors(self, digest: str) -> dict:
        from safetensors.torch import load

        return load(self.get_bytes(digest))

    def put_dir(self, directory: str | Path) -> str:
        """Store every file under `directory`; return the digest of its tree manifest."""
        directory = Path(directory)
        files = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = path.relative_to(directory).as_posix()
            if rel.endswith(".bin") or rel.endswith(".pt") or rel.endswith(".pkl"):
                raise ValueError(f"refusing to store pickle-based file {rel}; use safetensors")
            data = path.read_bytes()
            files.append({"path": rel, "size": len(data), "sha256": self.put_bytes(data)})
        return self.put_json({"kind": "tree", "files": files})

    def get_dir(self, digest: str, cache_dir: str | Path | None = None) -> Path:
        """Materialise a tree under a local cache directory and return its path. Every file
        of a copy made before is checked (size and sha256) against the tree, every time."""
        cache_root = Path(cache_dir or self.default_cache_dir())
        dest = cache_root / digest
        tree = self.get_json(digest)
        if tree.get("kind") != "tree":
            raise ValueError(f"object {digest} is not a directory tree")
        if (dest / ".complete").exists():
            problem = copy_problem(dest, tree)
            if problem:
                raise IntegrityError(
                    f"materialised copy {dest} of tree {self.object_uri(digest)} is corrupt: "
                    f"{problem}; refusing to use it. {REPAIR_HINT}."
                )
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=_mkdir(cache_root)))
        try:
            for entry in tree["files"]:
                rel = Path(entry["path"])
                if rel.is_absolute() or ".." in rel.parts:
                    raise IntegrityError(f"tree {digest} holds an unsafe path {entry['path']!r}")
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.get_bytes(entry["sha256"]))
            (tmp / ".complete").write_text(digest)
            try:
                os.replace(tmp, dest)
            except OSError:  # another process materialised it first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def tree_size(self, digest: str) -> int:
        return sum(e["size"] for e in self.get_json(digest)["files"])

    def default_cache_dir(self) -> Path:
        return Path(tempfile.gettempdir()) / "flminillm-cache"

    # checking a whole store --------------------------------------------------------------
    def object_keys(self) -> dict[str, list[str]]:
        """{digest: [keys]} of every object in the store, in every scope."""
        out: dict[str, list[str]] = {}
        for key in self._list("objects/sha256/") + self._list("parties/"):
            parts = key.split("/")
            if len(parts) >= 4 and parts[-4:-2] == ["objects", "sha256"]:
                out.setdefault(parts[-1], []).append(key)
        return out

    def verify(self, repair: bool = False, progress=None) -> StoreReport:
        """Check every object against its key and every materialised copy against its tree.
        With `repair`, drop what is corrupt: the objects (a step that produces one again
        writes it anew) and the copies (made again from the objects on next use)."""
        report = StoreReport()
        keys = self.object_keys()
        trees: dict[str, dict] = {}
        for digest, where in keys.items():
            for key in where:
                data = self._read(key)
                report.checked += 1
                if sha256_bytes(data) != digest:
                    report.corrupt_objects.append(key)
                    if repair:
                        self._delete(key)
                elif (tree := _as_tree(data)) is not None:
                    trees[digest] = tree
            if progress:
                progress()
        bad_blobs = {k.rsplit("/", 1)[-1] for k in report.corrupt_objects}
        report.affected = sorted(
            bad_blobs
            | {t for t, tree in trees.items() if {e["sha256"] for e in tree["files"]} & bad_blobs}
        )
        root = self.default_cache_dir()
        for marker in sorted(root.glob("*/.complete")) if root.is_dir() else []:
            dest = marker.parent
            tree = trees.get(dest.name)
            if tree is None:  # its tree is gone or corrupt: the copy cannot be checked
                problem = "its tree is not in the store (or is corrupt)"
            else:
                problem = copy_problem(dest, tree)
            report.checked += 1
            if problem:
                report.corrupt_copies.append(f"{dest}: {problem}")
                if repair:
                    shutil.rmtree(dest, ignore_errors=True)
        report.repaired = repair
        return report


def _as_tree(data: bytes) -> dict | None:
    """The tree manifest `data` holds, or None (another kind of object)."""
    if data[:1] != b"{" or len(data) > 1 << 24:
        return None
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) and obj.get("kind") == "tree" else None


def copy_problem(dest: Path, tree: dict) -> str:
    """What is wrong with the materialised copy `dest` of `tree` ('' when nothing)."""
    for entry in tree["files"]:
        path = dest / entry["path"]
        if not path.is_file():
            return f"{entry['path']} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{entry['path']} has {size} bytes, the tree says {entry['size']}"
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            return f"{entry['path']} has sha256 {actual}, the tree says {entry['sha256']}"
    return ""


@dataclass
class StoreReport:
    """What `Store.verify` found."""

    checked: int = 0
    corrupt_objects: list[str] = field(default_factory=list)  # keys
    corrupt_copies: list[str] = field(default_factory=list)  # "path: problem"
    affected: list[str] = field(default_factory=list)  # corrupt digests + trees holding them
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not (self.corrupt_objects or self.corrupt_copies)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


class LocalStore(Store):
    """A directory on the local file system."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def _read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def _write(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self._path(key), data)

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def object_uri(self, digest: str) -> str:
        return f"file://{self._path(self._key(digest))}"

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        parent = base if base.is_dir() else base.parent
        if not parent.is_dir():
            return []
        keys = [p.relative_to(self.root).as_posix() for p in parent.rglob("*") if p.is_file()]
        return [k for k in keys if k.startswith(prefix) and not Path(k).name.startswith(".")]

    def default_cache_dir(self) -> Path:
        return self.root / "materialized"


class StoreError(RuntimeError):
    """The store could not be reached or used (missing bucket, credentials, access, network)."""


_CREDENTIALS_HELP = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
    "credentials) in the environment, or use another source of the AWS default credential "
    "chain (AWS_PROFILE / ~/.aws/credentials, an IAM role); credentials are never read from "
    "the config or the store URI"
)


def _parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/") (prefix "" for the bucket root)."""
    if not uri.startswith("s3://"):
        raise ValueError("an S3 store URI must look like s3://bucket/prefix")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        # never echo the URI: it may hold credentials
        raise ValueError(
            "an S3 store URI must look like s3://bucket/prefix and hold no credentials or "
            f"port; {_CREDENTIALS_HELP}"
        )
    if not bucket:
        raise ValueError(f"S3 store URI {uri!r} names no bucket: use s3://bucket/prefix")
    prefix = "/".join(part for part in prefix.split("/") if part)
    if any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError("an S3 store URI's prefix may not hold '.' or '..' segments")
    return bucket, f"{prefix}/" if prefix else ""


def _strip_userinfo(url: str | None) -> str | None:
    """Drop any `user:password@` from an endpoint URL before it is shown anywhere."""
    if not url or "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    host = rest.split("/", 1)
    host[0] = host[0].rsplit("@", 1)[-1]
    return f"{scheme}{sep}{'/'.join(host)}" if sep else "/".join(host)


class S3Store(Store):
    """A bucket (and key prefix) on S3 or an S3-compatible server (MinIO, Ceph, moto).

    Credentials come only from the environment / the boto3 default chain. Objects are
    written with `upload_fileobj`; above `multipart_threshold_mb` the upload is multipart, and
    S3 makes an object visible only once its upload completes, so readers never see a
    partial object. A writer killed mid-upload leaves an *incomplete multipart upload* (no
    key points to it; it still costs storage): give the bucket a lifecycle rule
    `AbortIncompleteMultipartUpload` to clean them up.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = "us-east-1",
        multipart_threshold_mb: float = 64,
        check_bucket: bool = True,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"bad S3 bucket name {bucket!r}")
        if multipart_threshold_mb <= 0:
            raise ValueError("multipart_threshold_mb must be > 0")
        prefix = "/".join(part for part in prefix.split("/") if part)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.multipart_threshold_mb = multipart_threshold_mb
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client_obj = None
        self._session = None
        if check_bucket:
            self.check_bucket()

    # client ----------------------------------------------------------------------------
    @property
    def _client(self):
        if self._client_obj is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session(region_name=self.region)
            self._session = session
            if session.get_credentials() is None:
                raise StoreError(
                    f"no AWS credentials found for store {self.uri}: {_CREDENTIALS_HELP}"
                )
            self._client_obj = session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                config=Config(
                    retries={"max_attempts": 5, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=120,
                    # custom endpoints (MinIO, moto, an IP) rarely resolve bucket sub-domains
                    s3={"addressing_style": "path"} if self.endpoint_url else {},
                ),
            )
        return self._client_obj

    def __getstate__(self) -> dict:
        # a boto3 client does not pickle: a copy sent to another process builds its own
        state = self.__dict__.copy()
        state["_client_obj"] = None
        state["_session"] = None
        return state

    def __copy__(self) -> S3Store:
        # `scoped` views share the (thread-safe) boto3 client instead of building their own
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        return view

    def _redact(self, text: str) -> str:
        """Remove any credential string (and endpoint userinfo) from a message."""
        if self.endpoint_url and self.endpoint_url != _strip_userinfo(self.endpoint_url):
            text = text.replace(self.endpoint_url, _strip_userinfo(self.endpoint_url) or "")
        creds = self._session.get_credentials() if self._session is not None else None
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            for secret in (frozen.secret_key, frozen.token, frozen.access_key):
                if secret:
                    text = text.replace(secret, "***")
        return text

    def __repr__(self) -> str:
        where = (
            f", endpoint_url={_strip_userinfo(self.endpoint_url)!r}" if self.endpoint_url else ""
        )
        scope = f", scope={self.scope_prefix!r}" if self.scope_prefix else ""
        return f"S3Store({self.uri!r}{where}{scope})"

    def _full(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _where(self) -> str:
        return f" at {_strip_userinfo(self.endpoint_url)}" if self.endpoint_url else ""

    def _error(self, action: str, key: str | None, exc: BaseException) -> StoreError:
        """A clear error naming bucket/key; never includes credentials."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        target = (
            f"s3://{self.bucket}/{self._full(key)}"
            if key is not None
            else f"bucket {self.bucket!r}"
        )
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoreError(f"cannot {action} {target}: no AWS credentials; {_CREDENTIALS_HELP}")
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "?"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",):
                return StoreError(self._missing_bucket_message())
            hint = ""
            if code in (
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "ExpiredToken",
                "InvalidToken",
            ):
                hint = f"; the credentials were refused: {_CREDENTIALS_HELP}"
            elif code in ("AccessDenied", "403", "Forbidden"):
                hint = "; check the bucket policy / IAM permissions for these credentials"
            detail = f" {err['Message']}" if err.get("Message") else ""
            msg = f"cannot {action} {target}{self._where()}: {code} (HTTP {status}){detail}{hint}"
            return StoreError(self._redact(msg))
        msg = f"cannot {action} {target}{self._where()}: {type(exc).__name__}: {exc}"
        return StoreError(self._redact(msg))

    def _missing_bucket_message(self) -> str:
        endpoint = (
            f" --endpoint-url {_strip_userinfo(self.endpoint_url)}" if self.endpoint_url else ""
        )
        return (
            f"S3 bucket {self.bucket!r} does not exist{self._where()} (store {self.uri}); "
            f"create it first, e.g. `aws s3 mb s3://{self.bucket}{endpoint}`, or fix store.uri"
        )

    def check_bucket(self) -> None:
        """Fail early, with a clear message, if the bucket is missing or not accessible."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(self._missing_bucket_message()) from None
            raise self._error("access", None, exc) from None
        except BotoCoreError as exc:
            raise self._error("access", None, exc) from None

    # raw primitives ---------------------------------------------------------------------
    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        threshold = int(self.multipart_threshold_mb * 1024 * 1024)
        # S3 parts are at least 5 MiB (but the last); s3transfer grows parts past 10,000
        return TransferConfig(
            multipart_threshold=threshold,
            multipart_chunksize=max(threshold, 5 * 1024 * 1024),
        )

    def _read(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(
                    f"s3://{self.bucket}/{self._full(key)} not found in store {self.uri}"
                ) from None
            raise self._error("read", key, exc) from None
        except BotoCoreError as exc:
            raise self._error("read", key, exc) from None

    def _write(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.upload_fileobj(
                io.BytesIO(data), self.bucket, self._full(key), Config=self._transfer_config()
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error("write", key, exc) from None
        except Exception as exc:  # s3transfer wraps failures (e.g. S3UploadFailedError)
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientError | BotoCoreError):
                raise self._error("write", key, cause) from None
            raise self._error("write", key, exc) from None

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._full(key))
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error("check", key, exc) from None
        except BotoCoreError as exc:
            raise self._error("check", key, exc) from None

    def _delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error("delete", key, exc) from None

    _list_page_size = 1000

    def _list(self, prefix: str) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        keys = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket,
                Prefix=self._full(prefix),
                PaginationConfig={"PageSize": self._list_page_size},
            )
            for page in pages:
                keys += [obj["Key"][len(self.prefix) :] for obj in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as exc:
            raise self._error("list", prefix, exc) from None
        return [k for k in keys if not k.rsplit("/", 1)[-1].startswith(".")]

    def object_uri(self, digest: str) -> str:
        return f"s3://{self.bucket}/{self._full(self._key(digest))}"

    def default_cache_dir(self) -> Path:
        where = f"{_strip_userinfo(self.endpoint_url) or 'aws'}|{self.bucket}|{self.prefix}"
        tag = hashlib.sha256(where.encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "flminillm-cache" / f"s3-{tag}"


def open_store(
    uri: str,
    endpoint_url: str | None = None,
    region: str | None = "us-east-1",
    multipart_threshold_mb: float = 64,
) -> Store:
    """Open the store at `uri`: a local path, a file:// URI, or s3://bucket/prefix.

    For S3, `endpoint_url` selects an S3-compatible server (None: AWS, or the
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL environment variable); credentials come only from
    the environment / boto3 default chain."""
    if uri.startswith("s3://"):
        bucket, prefix = _parse_s3_uri(uri)
        return S3Store(
            bucket,
            prefix,
            endpoint_url=endpoint_url,
            region=region,
            multipart_threshold_mb=multipart_threshold_mb,
        )
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://") :])
    if "://" in uri:
        raise ValueError(
            f"unsupported store URI scheme {uri.split('://', 1)[0]!r}: use a local directory, "
            "file://path or s3://bucket/prefix"
        )
    return LocalStore(uri)


def open_store_from_config(store_cfg: Any) -> Store:
    """Open the store a `StoreConfig` describes (uri, endpoint_url, region,
    multipart_threshold_mb)."""
    return open_store(
        store_cfg.uri,
        endpoint_url=getattr(store_cfg, "endpoint_url", None),
        region=getattr(store_cfg, "region", "us-east-1"),
        multipart_threshold_mb=getattr(store_cfg, "multipart_threshold_mb", 64),
    )
