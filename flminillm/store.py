"""Content-addressed artifact store.

Every object is keyed by the sha256 of its bytes and verified on every read, so a
tampered or truncated object is refused instead of silently used. Writes are atomic
(temporary file + rename): a reader never sees a partial object, and a writer killed
mid-way leaves only a temporary file that no key points to.

Directories (model checkpoints, tokenizers) are stored as a *tree*: a JSON manifest
listing each file's relative path, size and digest; the tree's digest is the digest of
that manifest, so a model is addressed by one sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

HEX = set("0123456789abcdef")


class IntegrityError(RuntimeError):
    """An object's bytes do not match the digest it is stored under."""


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

    def object_uri(self, digest: str) -> str:
        raise NotImplementedError

    @staticmethod
    def _key(digest: str) -> str:
        return f"objects/sha256/{digest[:2]}/{digest}"

    # verified blob API ----------------------------------------------------------------
    def put_bytes(self, data: bytes) -> str:
        digest = sha256_bytes(data)
        key = self._key(digest)
        if not self._exists(key):
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
                f"({len(data)} bytes); refusing to use it. Re-run the step that produced it."
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
        """Materialise a tree under a local cache directory (verified) and return its path."""
        cache_root = Path(cache_dir or self.default_cache_dir())
        dest = cache_root / digest
        if (dest / ".complete").exists():
            return dest
        tree = self.get_json(digest)
        if tree.get("kind") != "tree":
            raise ValueError(f"object {digest} is not a directory tree")
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


def open_store(uri: str) -> Store:
    """Open the store at `uri`: a local path or file:// URI."""
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://") :])
    if "://" in uri:
        raise ValueError(f"unsupported store URI {uri!r}: use a local directory")
    return LocalStore(uri)
