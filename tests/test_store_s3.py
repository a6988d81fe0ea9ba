"""The S3 artifact store against a real moto S3 server, and one contract shared with LocalStore."""

from __future__ import annotations

import hashlib
import pickle
import types
from pathlib import Path

import pytest

from flminillm.store import (
    IntegrityError,
    LocalStore,
    ObjectNotFound,
    S3Store,
    Store,
    StoreError,
    open_store,
    open_store_from_config,
)
from tests.s3_server import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, s3_client

MiB = 1024 * 1024


# --- a backend: a store plus raw access to its keys, bypassing the store ------------------


class LocalBackend:
    def __init__(self, tmp_path: Path) -> None:
        self.store = LocalStore(tmp_path / "store")
        self.root = self.store.root

    def reopen(self) -> Store:
        return open_store(f"file://{self.root}")

    def raw_keys(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()
        )

    def raw_put(self, key: str, data: bytes) -> None:
        (self.root / key).write_bytes(data)


class S3Backend:
    def __init__(self, endpoint: str, bucket: str, prefix: str = "runs/exp1") -> None:
        self.endpoint, self.bucket, self.prefix = endpoint, bucket, prefix
        self.store = open_store(f"s3://{bucket}/{prefix}", endpoint_url=endpoint)
        self.s3 = s3_client(endpoint)

    def reopen(self) -> Store:
        return open_store(f"s3://{self.bucket}/{self.prefix}", endpoint_url=self.endpoint)

    def raw_keys(self) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        assert all(k.startswith(self.prefix + "/") for k in keys)
        return sorted(k[len(self.prefix) + 1 :] for k in keys)

    def raw_put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    if request.param == "local":
        return LocalBackend(tmp_path)
    endpoint, bucket = request.getfixturevalue("s3_env")
    return S3Backend(endpoint, bucket)


def _object_key(digest: str, scope: str = "") -> str:
    return f"{scope}objects/sha256/{digest[:2]}/{digest}"


# --- the contract both stores keep ----------------------------------------------------------


def test_contract_bytes_round_trip(backend):
    store = backend.store
    data = b"hello federated world\x00\xff" * 100
    digest = store.put_bytes(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.exists(digest)
    assert store.get_bytes(digest) == data
    assert store.put_bytes(bytes(data)) == digest  # stored once
    assert backend.raw_keys() == [_object_key(digest)]
    assert backend.reopen().get_bytes(digest) == data  # a fresh store on the same URI sees it
    assert store.object_uri(digest).startswith(store.uri.rstrip("/") + "/")
    assert store.object_uri(digest).endswith(_object_key(digest))


def test_contract_json_and_tensors(backend):
    import torch

    store = backend.store
    d = store.put_json({"b": [1, 2], "a": "x"})
    assert store.get_json(d) == {"a": "x", "b": [1, 2]}
    assert store.put_json({"a": "x", "b": [1, 2]}) == d
    w = torch.arange(12, dtype=torch.float32).view(3, 4)
    t = store.put_tensors({"w": w, "b": torch.ones(2, dtype=torch.bfloat16)}, {"round": "3"})
    got = store.get_tensors(t)
    assert torch.equal(got["w"], w) and torch.equal(got["b"], torch.ones(2, dtype=torch.bfloat16))


def test_contract_dir_round_trip(backend, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"n": 1}')
    (src / "model.safetensors").write_bytes(b"\x00\x01weights" * 1000)
    (src / "sub" / "tok.json").write_text("tokens")
    (src / "sub" / "empty.txt").write_bytes(b"")
    store = backend.store
    digest = store.put_dir(src)
    assert store.tree_size(digest) == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    out = store.get_dir(digest, cache_dir=tmp_path / "cache")
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    want = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    assert got.pop(".complete") == digest.encode()
    assert got == want
    assert backend.reopen().put_dir(src) == digest


def test_contract_records(backend):
    store = backend.store
    assert store.list_records("round-") == []
    store.put_record("round-2/alice", {"round": 2, "party": "alice"})
    store.put_record("round-1/bob", {"round": 1, "party": "bob"})
    store.put_record("round-1/alice", {"round": 1, "party": "alice"})
    store.put_record("other/x", {"x": 1})
    assert store.list_records("round-1/") == [
        {"round": 1, "party": "alice"},
        {"round": 1, "party": "bob"},
    ]
    assert [r["round"] for r in store.list_records("round-")] == [1, 1, 2]
    store.put_record("round-1/bob", {"round": 1, "party": "bob", "v": 2})  # replaced
    assert store.list_records("round-1/b") == [{"round": 1, "party": "bob", "v": 2}]
    # records are shared by every scope (the ledger), and seen by a fresh store
    assert store.scoped("alice").list_records("round-1/") == store.list_records("round-1/")
    assert backend.reopen().list_records("other/") == [{"x": 1}]


def test_contract_scoped_views(backend):
    store = backend.store
    alice, bob = store.scoped("alice"), store.scoped("bob")
    secret = b"alice's private shard"
    digest = alice.put_bytes(secret)
    assert backend.raw_keys() == [_object_key(digest, "parties/alice/")]
    assert alice.object_uri(digest).endswith("parties/alice/" + _object_key(digest))
    assert alice.get_bytes(digest) == secret
    # not visible from another scope, nor from the unscoped store
    assert not bob.exists(digest)
    assert not store.exists(digest)
    with pytest.raises(ObjectNotFound):
        bob.get_bytes(digest)
    # the same bytes in two scopes are two objects
    assert bob.put_bytes(secret) == digest
    assert backend.raw_keys() == sorted(
        [_object_key(digest, "parties/alice/"), _object_key(digest, "parties/bob/")]
    )
    assert store.scope_prefix == ""  # the parent is unchanged
    with pytest.raises(ValueError):
        store.scoped("../evil")


def test_contract_tampered_object_is_refused(backend):
    store = backend.store
    digest = store.put_bytes(b"the real model weights")
    backend.raw_put(_object_key(digest), b"the evil model weights")
    with pytest.raises(IntegrityError) as err:
        store.get_bytes(digest)
    assert digest in str(err.value) and "corrupt" in str(err.value)
    assert store.object_uri(digest) in str(err.value)


def test_contract_truncated_object_is_refused(backend):
    store = backend.store
    data = bytes(range(256)) * 64
    digest = store.put_bytes(data)
    backend.raw_put(_object_key(digest), data[:100])
    with pytest.raises(IntegrityError, match=digest):
        store.get_bytes(digest)
    with pytest.raises(IntegrityError):
        store.get_json(digest)


def test_contract_missing_object(backend, tmp_path):
    store = backend.store
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(missing)
    with pytest.raises(ObjectNotFound, match=missing):
        store.get_bytes(missing)
    with pytest.raises(ObjectNotFound):
        store.get_dir(missing, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError):
        store.get_bytes("../" + "0" * 61)


# --- S3 specifics -----------------------------------------------------------------------------


def test_s3_uri_prefix_and_keys(s3_env):
    endpoint, bucket = s3_env
    store = open_store(f"s3://{bucket}//a/b/", endpoint_url=endpoint)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.uri) == (bucket, "a/b/", f"s3://{bucket}/a/b")
    digest = store.put_bytes(b"x")
    assert store.object_uri(digest) == f"s3://{bucket}/a/b/{_object_key(digest)}"
    keys = [o["Key"] for o in s3_client(endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"a/b/{_object_key(digest)}"]
    # another prefix in the same bucket is another store
    other = open_store(f"s3://{bucket}/a", endpoint_url=endpoint)
    assert not other.exists(digest)
    # the bucket root works too
    root = open_store(f"s3://{bucket}", endpoint_url=endpoint)
    assert root.uri == f"s3://{bucket}" and root.prefix == ""
    assert root.get_bytes(root.put_bytes(b"y")) == b"y"
    assert root.object_uri(digest) == f"s3://{bucket}/{_object_key(digest)}"
    # each bucket/prefix gets its own local cache directory
    assert store.default_cache_dir() != other.default_cache_dir()
    assert store.default_cache_dir() == store.scoped("alice").default_cache_dir()


def test_s3_listing_paginates(s3_env):
    endpoint, bucket = s3_env
    store = S3Store(bucket, "p", endpoint_url=endpoint)
    store._list_page_size = 4  # several list_objects_v2 pages
    for i in range(11):
        store.put_record(f"many/{i:03d}", {"i": i})
    store.put_record("manx", {"i": -1})
    assert [r["i"] for r in store.list_records("many/")] == list(range(11))
    assert store._list("records/many/00") == [f"records/many/{i:03d}" for i in range(10)]
    assert len(store.list_records("man")) == 12


def test_s3_multipart_upload(s3_env):
    endpoint, bucket = s3_env
    store = open_store(f"s3://{bucket}/mp", endpoint_url=endpoint, multipart_threshold_mb=5)
    big = hashlib.sha256(b"seed").digest() * (6 * MiB // 32)
    assert len(big) == 6 * MiB
    digest = store.put_bytes(big)
    head = s3_client(endpoint).head_object(Bucket=bucket, Key=f"mp/{_object_key(digest)}")
    assert head["ContentLength"] == 6 * MiB
    assert head["ETag"].strip('"').endswith("-2")  # a multipart object: 5 MiB + 1 MiB parts
    assert store.get_bytes(digest) == big
    small = store.put_bytes(b"small" * 1000)
    head = s3_client(endpoint).head_object(Bucket=bucket, Key=f"mp/{_object_key(small)}")
    assert "-" not in head["ETag"].strip('"')  # below the threshold: one PUT


def test_s3_credentials_never_shown(s3_env, monkeypatch):
    endpoint, bucket = s3_env
    store = open_store(f"s3://{bucket}/c", endpoint_url=endpoint)
    digest = store.put_bytes(b"payload")
    shown = [repr(store), str(store.uri), store.object_uri(digest), repr(store.scoped("alice"))]
    s3_client(endpoint).put_object(Bucket=bucket, Key=f"c/{_object_key(digest)}", Body=b"evil")
    for call in (
        lambda: store.get_bytes(digest),
        lambda: store.get_bytes(hashlib.sha256(b"nope").hexdigest()),
        lambda: open_store(f"s3://{bucket}-missing/c", endpoint_url=endpoint),
        lambda: open_store(f"s3://{FAKE_ACCESS_KEY}:{FAKE_SECRET_KEY}@{bucket}/c"),
    ):
        with pytest.raises(Exception) as err:
            call()
        shown.append(str(err.value))
    # a bucket deleted under a live store: the S3 error is wrapped, naming bucket and key
    s3 = s3_client(endpoint)
    for obj in s3.list_objects_v2(Bucket=bucket)["Contents"]:
        s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)
    with pytest.raises(StoreError) as err:
        store.put_bytes(b"after the bucket is gone")
    assert bucket in str(err.value)
    shown.append(str(err.value))
    # a message that quoted the credentials would be redacted
    from botocore.exceptions import ClientError

    exc = ClientError(
        {"Error": {"Code": "SignatureDoesNotMatch", "Message": f"bad {FAKE_SECRET_KEY}"}}, "Put"
    )
    msg = str(store._error("write", "objects/x", exc))
    assert "AWS_ACCESS_KEY_ID" in msg and f"s3://{bucket}/c/objects/x" in msg
    shown.append(msg)
    userinfo = S3Store(
        bucket, endpoint_url=f"http://u:{FAKE_SECRET_KEY}@127.0.0.1:1", check_bucket=False
    )
    shown += [repr(userinfo), userinfo.uri, str(userinfo.default_cache_dir())]
    for text in shown:
        assert FAKE_SECRET_KEY not in text, text


def test_s3_missing_bucket_error(s3_env):
    endpoint, bucket = s3_env
    with pytest.raises(StoreError) as err:
        open_store(f"s3://{bucket}-nope/runs", endpoint_url=endpoint)
    msg = str(err.value)
    assert f"{bucket}-nope" in msg and "does not exist" in msg
    assert f"aws s3 mb s3://{bucket}-nope --endpoint-url {endpoint}" in msg


def test_s3_missing_credentials_error(s3_env, monkeypatch):
    endpoint, bucket = s3_env
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError) as err:
        open_store(f"s3://{bucket}/runs", endpoint_url=endpoint)
    assert "AWS_ACCESS_KEY_ID" in str(err.value) and "AWS_SECRET_ACCESS_KEY" in str(err.value)


def test_s3_bad_uris():
    for bad in ("s3://", "s3:///prefix", "s3://bucket/a/../b"):
        with pytest.raises(ValueError):
            open_store(bad)
    with pytest.raises(ValueError, match="unsupported store URI scheme 'gs'"):
        open_store("gs://bucket/x")


def test_s3_scoped_views_share_client_and_pickle(s3_env):
    endpoint, bucket = s3_env
    store = S3Store(bucket, "p", endpoint_url=endpoint)
    view = store.scoped("exchange")
    assert view._client is store._client
    digest = view.put_bytes(b"shared")
    clone = pickle.loads(pickle.dumps(view))
    assert clone.scope_prefix == "parties/exchange/"
    assert clone.get_bytes(digest) == b"shared"


def test_open_store_from_config(s3_env, monkeypatch, tmp_path):
    from flminillm.config import StoreConfig

    endpoint, bucket = s3_env
    uri = f"s3://{bucket}/cfg"
    if "endpoint_url" in StoreConfig.model_fields:
        cfg = StoreConfig(
            uri=uri, endpoint_url=endpoint, region="us-east-1", multipart_threshold_mb=5
        )
    else:  # older schema: botocore reads the endpoint from the environment
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        cfg = StoreConfig(uri=uri)
    store = open_store_from_config(cfg)
    assert isinstance(store, S3Store) and store.uri == uri
    assert store.get_bytes(store.put_bytes(b"cfg")) == b"cfg"
    ns = types.SimpleNamespace(
        uri=uri, endpoint_url=endpoint, region="us-east-1", multipart_threshold_mb=7
    )
    assert open_store_from_config(ns).multipart_threshold_mb == 7
    local = open_store_from_config(StoreConfig(uri=str(tmp_path / "s")))
    assert isinstance(local, LocalStore)
