"""A real moto S3 server process on 127.0.0.1 for the S3 store tests (no AWS, no network)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"
FAKE_ACCESS_KEY = "testing"
# a recognisable fake secret: tests assert it never shows up in reprs, URIs or errors
FAKE_SECRET_KEY = "fake-secret-Zq8wX3vN0pL5"

# variables that could point boto3 at real credentials or another endpoint
_CLEARED = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False


@contextmanager
def moto_server(timeout: float = 30.0) -> Iterator[str]:
    """Start `python -m moto.server` on a free local port; yield its endpoint URL."""
    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + timeout
        while not _answers(endpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"moto server on {endpoint} did not start:\n{tail}")
            time.sleep(0.05)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        Path(log.name).unlink(missing_ok=True)


def fake_aws_env(tmp_dir: str | Path) -> dict[str, str]:
    """Environment variables for fake credentials, isolated from any real AWS config."""
    tmp_dir = Path(tmp_dir)
    return {
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_dir / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_dir / "no-aws-credentials"),
    }


def apply_fake_aws_env(monkeypatch, tmp_dir: str | Path) -> None:
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in fake_aws_env(tmp_dir).items():
        monkeypatch.setenv(name, value)


def unique_bucket_name() -> str:
    return f"flminillm-test-{uuid.uuid4().hex[:16]}"


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=FAKE_ACCESS_KEY,
        aws_secret_access_key=FAKE_SECRET_KEY,
    )
