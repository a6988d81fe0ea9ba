"""Tests for the content-addressed artifact store (flminillm.store)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from flminillm.store import (
    IntegrityError,
    LocalStore,
    ObjectNotFound,
    atomic_write_bytes,
    open_store,
)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _object_path(store: LocalStore, digest: str) -> Path:
    return store.root / "objects" / "sha256" / digest[:2] / digest


def test_put_get_round_trip_and_digest(store):
    data = b"hello federated world\x00\xff"
    digest = store.put_bytes(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.get_bytes(digest) == data
    assert store.exists(digest)
    assert _object_path(store, digest).read_bytes() == data
    # same bytes -> same digest, stored once; different bytes -> different digest
    assert store.put_bytes(bytes(data)) == digest
    assert store.put_bytes(data + b"!") != digest
    # a second store object on the same root sees the object (open_store path and file URI)
    assert open_store(str(store.root)).get_bytes(digest) == data
    assert open_store(f"file://{store.root}").get_bytes(digest) == data


def test_json_and_tensor_helpers(store):
    import torch

    d = store.put_json({"b": [1, 2], "a": "x"})
    assert store.get_json(d) == {"a": "x", "b": [1, 2]}
    assert store.put_json({"a": "x", "b": [1, 2]}) == d  # key order does not matter
    t = store.put_tensors({"w": torch.arange(6, dtype=torch.int32).view(2, 3)})
    assert torch.equal(store.get_tensors(t)["w"], torch.arange(6, dtype=torch.int32).view(2, 3))


def test_tampered_object_is_refused(store):
    digest = store.put_bytes(b"the real model weights")
    _object_path(store, digest).write_bytes(b"the evil model weights")
    with pytest.raises(IntegrityError) as err:
        store.get_bytes(digest)
    assert digest in str(err.value)
    assert "corrupt" in str(err.value)


def test_truncated_object_is_refused(store):
    data = bytes(range(256)) * 4
    digest = store.put_bytes(data)
    _object_path(store, digest).write_bytes(data[:100])
    with pytest.raises(IntegrityError, match=digest):
        store.get_bytes(digest)
    with pytest.raises(IntegrityError):
        store.get_json(digest)


def test_missing_and_bad_digest(store):
    missing = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(ObjectNotFound, match=missing):
        store.get_bytes(missing)
    assert not store.exists(missing)
    for bad in ("abc", "G" * 64, "A" * 64, "../" + "0" * 61, missing + "0", ""):
        with pytest.raises(ValueError):
            store.get_bytes(bad)
        with pytest.raises(ValueError):
            store.exists(bad)


def _make_dir(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "config.json").write_text('{"n": 1}')
    (root / "model.safetensors").write_bytes(b"\x00\x01weights" * 10)
    (root / "sub" / "tok.json").write_text("tokens")
    (root / "sub" / "deeper" / "empty.txt").write_bytes(b"")
    return root


def test_put_dir_get_dir_round_trip(store, tmp_path):
    src = _make_dir(tmp_path / "src")
    digest = store.put_dir(src)
    tree = store.get_json(digest)
    assert tree["kind"] == "tree"
    assert sorted(e["path"] for e in tree["files"]) == [
        "config.json",
        "model.safetensors",
        "sub/deeper/empty.txt",
        "sub/tok.json",
    ]
    assert store.tree_size(digest) == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    out = store.get_dir(digest, cache_dir=tmp_path / "cache")
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    want = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    assert got.pop(".complete") == digest.encode()
    assert got == want
    # the same content gives the same tree digest; a second get_dir reuses the cache
    assert store.put_dir(src) == digest
    assert store.get_dir(digest, cache_dir=tmp_path / "cache") == out
    # changing one byte changes the tree digest
    (src / "sub" / "tok.json").write_text("tokenz")
    assert store.put_dir(src) != digest


def test_get_dir_verifies_members(store, tmp_path):
    src = _make_dir(tmp_path / "src")
    digest = store.put_dir(src)
    member = next(e for e in store.get_json(digest)["files"] if e["path"] == "sub/tok.json")
    _object_path(store, member["sha256"]).write_bytes(b"tampered")
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match=member["sha256"]):
        store.get_dir(digest, cache_dir=cache)
    assert not (cache / digest).exists()
    assert list(cache.iterdir()) == []  # the temporary directory is cleaned up


@pytest.mark.parametrize("name", ["pytorch_model.bin", "optimizer.pt", "state.pkl"])
def test_put_dir_refuses_pickles(store, tmp_path, name):
    src = _make_dir(tmp_path / "src")
    (src / "sub" / name).write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickle"):
        store.put_dir(src)


@pytest.mark.parametrize("bad_path", ["../evil.txt", "sub/../../evil.txt", "/tmp/evil.txt"])
def test_get_dir_refuses_unsafe_paths(store, tmp_path, bad_path):
    blob = store.put_bytes(b"payload")
    digest = store.put_json(
        {
            "kind": "tree",
            "files": [
                {"path": "ok.txt", "size": 7, "sha256": blob},
                {"path": bad_path, "size": 7, "sha256": blob},
            ],
        }
    )
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match="unsafe path"):
        store.get_dir(digest, cache_dir=cache)
    assert not (cache / digest).exists()
    assert not (cache / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert list(cache.iterdir()) == []


def test_get_dir_refuses_non_tree(store, tmp_path):
    digest = store.put_json({"kind": "blob"})
    with pytest.raises(ValueError, match="not a directory tree"):
        store.get_dir(digest, cache_dir=tmp_path / "cache")


def test_atomic_write_success_leaves_no_temp(tmp_path):
    target = tmp_path / "d" / "file.bin"
    atomic_write_bytes(target, b"abc")
    atomic_write_bytes(target, b"defg")
    assert target.read_bytes() == b"defg"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"

    def boom(src, dst):
        assert Path(src).read_bytes() == b"new content"  # fully written before the rename
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(target, b"new content")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    # an existing target keeps its old content intact
    monkeypatch.undo()
    atomic_write_bytes(target, b"old content")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_records(store):
    assert store.list_records("round-") == []
    store.put_record("round-2/alice", {"round": 2, "party": "alice"})
    store.put_record("round-1/bob", {"round": 1, "party": "bob"})
    store.put_record("round-1/alice", {"round": 1, "party": "alice"})
    store.put_record("other", {"x": 1})
    got = store.list_records("round-")
    assert got == [
        {"round": 1, "party": "alice"},
        {"round": 1, "party": "bob"},
        {"round": 2, "party": "alice"},
    ]
    assert store.list_records("round-1/") == got[:2]
    # a later write replaces the record
    store.put_record("round-1/bob", {"round": 1, "party": "bob", "retry": True})
    assert store.list_records("round-1/b") == [{"round": 1, "party": "bob", "retry": True}]
    assert store.list_records("oth") == [{"x": 1}]
    # a stray temporary file (a writer killed mid-way) is not listed
    (store.root / "records" / "round-1" / ".alice.123.tmp").write_text("{partial")
    assert store.list_records("round-1/") == [got[0], {"round": 1, "party": "bob", "retry": True}]
