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


def _flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights" * 1000)
    (d / "config.json").write_text('{"a": 1}')
    return d


def test_a_corrupt_materialised_copy_is_refused_every_time_it_is_used(tmp_path):
    store = LocalStore(tmp_path / "store")
    digest = store.put_dir(_model_dir(tmp_path))
    copy = store.get_dir(digest)
    assert store.get_dir(digest) == copy  # an intact copy is used as it is
    _flip_byte(copy / "model.safetensors")
    with pytest.raises(IntegrityError, match="model.safetensors has sha256") as err:
        store.get_dir(digest)
    assert str(copy) in str(err.value) and "flminillm store verify --repair" in str(err.value)
    (copy / "config.json").unlink()
    with pytest.raises(IntegrityError, match="config.json is missing"):
        store.get_dir(digest)


def test_writing_an_object_again_replaces_a_corrupt_one(tmp_path, capsys):
    store = LocalStore(tmp_path / "store")
    data = b"some object" * 100
    digest = store.put_bytes(data)
    path = Path(store.object_uri(digest).removeprefix("file://"))
    _flip_byte(path)
    with pytest.raises(IntegrityError, match="flminillm store verify --repair"):
        store.get_bytes(digest)
    assert store.put_bytes(data) == digest  # the step that produced it runs again
    assert store.get_bytes(digest) == data
    assert "replacing corrupt object" in capsys.readouterr().err


def test_verify_finds_and_repair_drops_corrupt_objects_and_copies(tmp_path):
    store = LocalStore(tmp_path / "store")
    scoped = store.scoped("alice")
    tree = scoped.put_dir(_model_dir(tmp_path))
    other = store.scoped("public").put_json({"fine": True})
    copy = scoped.get_dir(tree)
    report = store.verify()
    assert report.ok and report.checked == 4 + 1  # 2 files + tree + json; 1 copy
    blob = next(e["sha256"] for e in scoped.get_json(tree)["files"]
                if e["path"] == "model.safetensors")  # fmt: skip
    _flip_byte(Path(scoped.object_uri(blob).removeprefix("file://")))
    _flip_byte(copy / "config.json", 0)
    report = store.verify()
    assert not report.ok
    assert [k.rsplit("/", 1)[-1] for k in report.corrupt_objects] == [blob]
    assert len(report.corrupt_copies) == 1 and "config.json" in report.corrupt_copies[0]
    assert set(report.affected) == {blob, tree}  # the blob and the tree that holds it
    assert scoped.exists(blob) and copy.exists()  # without --repair nothing is dropped
    repaired = store.verify(repair=True)
    assert repaired.repaired and not scoped.exists(blob) and not copy.exists()
    assert store.scoped("public").get_json(other) == {"fine": True}  # the rest is untouched
    again = store.verify()
    assert again.ok
