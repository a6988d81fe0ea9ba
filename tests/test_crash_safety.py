"""A step killed (SIGKILL) in the middle of a write leaves no object a later step reads as valid.

Each test runs the writer in a child Python process whose write is slowed down half-way; the
child signals the parent through a file once it is mid-write, the parent SIGKILLs it, then checks
the store as a later step would see it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flminillm.store import LocalStore, ObjectNotFound, S3Store
from tests.s3_server import s3_client

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")


def _payload(size: int) -> bytes:
    block = hashlib.sha256(b"checkpoint").digest()
    return (b"SLOWME" + block * (size // len(block) + 1))[:size]


# The child: slow down `os.fdopen(...).write` (used by atomic_write_bytes) for any payload that
# holds the trigger bytes: write half, fsync, signal the parent, then sleep until killed.
_LOCAL_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    root, signal_path, trigger, action, arg = sys.argv[1:6]
    sys.path.insert(0, {repo!r})
    from flminillm import store as st

    real_fdopen = os.fdopen

    class SlowFile:
        def __init__(self, f):
            self.f = f
        def write(self, data):
            if trigger.encode() not in bytes(data):
                return self.f.write(data)
            half = len(data) // 2
            self.f.write(data[:half])
            self.f.flush()
            os.fsync(self.f.fileno())
            with open(signal_path + ".part", "w") as s:
                json.dump({{"half": half}}, s)
            os.replace(signal_path + ".part", signal_path)
            time.sleep(120)
            return self.f.write(data[half:])
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    st.os.fdopen = lambda *a, **k: SlowFile(real_fdopen(*a, **k))
    store = st.LocalStore(root)
    if action == "put_bytes":
        block = __import__("hashlib").sha256(b"checkpoint").digest()
        size = int(arg)
        store.put_bytes((b"SLOWME" + block * (size // len(block) + 1))[:size])
    elif action == "put_dir":
        store.put_dir(arg)
    print("finished: the write was not interrupted", flush=True)
    """
).format(repo=str(ROOT))


def _run_and_kill(args: list[str], signal_path: Path, env=None, timeout: float = 20.0) -> dict:
    """Start the child, wait until it signals that it is mid-write, SIGKILL it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + timeout
        while not signal_path.exists():
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace")
                pytest.fail(f"writer exited ({proc.returncode}) before it was killed:\n{out}")
            if time.monotonic() > deadline:
                pytest.fail("writer never reached the middle of its write")
            time.sleep(0.02)
        info = json.loads(signal_path.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        return info
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _leftover_temp_files(store: LocalStore) -> list[Path]:
    return [p for p in store.root.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


def test_local_put_bytes_killed_mid_write(tmp_path):
    root, sig = tmp_path / "store", tmp_path / "mid-write"
    size = 8 * MiB
    data = _payload(size)
    digest = hashlib.sha256(data).hexdigest()
    info = _run_and_kill([_LOCAL_CHILD, str(root), str(sig), "SLOWME", "put_bytes", str(size)], sig)

    store = LocalStore(root)
    final = root / "objects" / "sha256" / digest[:2] / digest
    # the child really was mid-write: half the bytes sit in a temporary file
    temps = _leftover_temp_files(store)
    assert [p.stat().st_size for p in temps] == [info["half"]]
    # ... which no key points to: a later step sees no object at all
    assert not final.exists()
    assert not store.exists(digest)
    with pytest.raises(ObjectNotFound, match=digest):
        store.get_bytes(digest)
    for tmp in temps:
        assert tmp.name.startswith(".") and tmp.name != digest
        assert tmp.parent == final.parent  # same directory: the rename would have been atomic
    assert store._list("objects/") == []
    # a retry of the step writes the object whole
    assert store.put_bytes(data) == digest
    assert store.get_bytes(digest) == data


@pytest.mark.parametrize("killed_in", ["member", "manifest"])
def test_local_put_dir_killed_mid_way(tmp_path, killed_in):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "a_config.json").write_text('{"layers": 2}')
    (src / "b_model.safetensors").write_bytes(_payload(4 * MiB))
    (src / "sub" / "c_tokenizer.json").write_text('{"vocab": {}}')
    # the tree digest a complete put_dir gives, computed on a separate store
    tree = LocalStore(tmp_path / "reference").put_dir(src)
    members = LocalStore(tmp_path / "reference").get_json(tree)["files"]
    trigger = "SLOWME" if killed_in == "member" else '"kind": "tree"'
    root, sig = tmp_path / "store", tmp_path / "mid-write"
    _run_and_kill([_LOCAL_CHILD, str(root), str(sig), trigger, "put_dir", str(src)], sig)

    store = LocalStore(root)
    assert not store.exists(tree)  # the manifest is written last: no tree to read
    with pytest.raises(ObjectNotFound, match=tree):
        store.get_dir(tree, cache_dir=tmp_path / "cache")
    assert not (root / "objects" / "sha256" / tree[:2] / tree).exists()
    done = {m["path"]: store.exists(m["sha256"]) for m in members}
    if killed_in == "member":  # files are written in order; the one being written is absent
        assert done == {
            "a_config.json": True,
            "b_model.safetensors": False,
            "sub/c_tokenizer.json": False,
        }
    else:
        assert all(done.values())
    for m in members:  # whatever was written is whole and verified
        if done[m["path"]]:
            assert len(store.get_bytes(m["sha256"])) == m["size"]
    assert len(_leftover_temp_files(store)) == 1
    # the retried step completes the tree
    assert store.put_dir(src) == tree
    assert store.tree_size(tree) == sum(m["size"] for m in members)


_S3_CHILD = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    endpoint, bucket, signal_path, size = sys.argv[1:5]
    sys.path.insert(0, {repo!r})
    from flminillm.store import S3Store

    store = S3Store(bucket, "runs", endpoint_url=endpoint, multipart_threshold_mb=5)

    def stall(**kwargs):  # once a part is uploaded: signal the parent, then hang
        if not os.path.exists(signal_path):
            with open(signal_path + ".part", "w") as s:
                json.dump({{"parts": 1}}, s)
            os.replace(signal_path + ".part", signal_path)
        time.sleep(120)

    store._client.meta.events.register("after-call.s3.UploadPart", stall)
    block = hashlib.sha256(b"checkpoint").digest()
    size = int(size)
    store.put_bytes((b"SLOWME" + block * (size // len(block) + 1))[:size])
    print("finished: the upload was not interrupted", flush=True)
    """
).format(repo=str(ROOT))


def test_s3_multipart_upload_killed_mid_way(s3_env, tmp_path):
    endpoint, bucket = s3_env
    size = 12 * MiB  # three 5 MiB parts
    data = _payload(size)
    digest = hashlib.sha256(data).hexdigest()
    key = f"runs/objects/sha256/{digest[:2]}/{digest}"
    sig = tmp_path / "mid-upload"
    s3 = s3_client(endpoint)
    # the child inherits the fake credentials that s3_env put in the environment
    child = [_S3_CHILD, endpoint, bucket, str(sig), str(size)]
    _run_and_kill(child, sig)

    # the child really was mid-upload: a multipart upload for the key is open
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [key]
    # ... but no object: a later step sees nothing
    store = S3Store(bucket, "runs", endpoint_url=endpoint, multipart_threshold_mb=5)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
    assert not store.exists(digest)
    with pytest.raises(ObjectNotFound, match=digest):
        store.get_bytes(digest)
    # clean up the orphaned upload (in production: a bucket lifecycle rule), retry the step
    for u in uploads:
        s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    assert store.put_bytes(data) == digest
    assert store.get_bytes(digest) == data
