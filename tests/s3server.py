"""A real S3-compatible server on 127.0.0.1 for the remote-storage tests: moto's server mode.

Why moto and not MinIO: the MinIO *server* is on neither of the registries this machine and CI reach
(PyPI has only its Python client ``minio``, Debian has no ``minio`` package), while ``moto[server]`` is a
PyPI package (pinned in the ``test`` extra) that serves the S3 REST API over HTTP. pyarrow's S3 client,
Ray Data read tasks and Ray Train storage talk to it exactly as to AWS: nothing is mocked in-process.

Credentials are dummy values in environment variables only (never in files); ``AWS_ENDPOINT_URL``
points every S3 client (pyarrow, boto3) at the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """A running moto server: ``endpoint`` (``http://127.0.0.1:PORT``) and the env vars that reach it."""

    endpoint: str
    proc: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use the server through any S3 client (dummy credentials)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):  # boto3 S3 client for setup and checks
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def upload_dir(self, local: str, bucket: str, prefix: str) -> list[str]:
        """Upload the files of ``local`` (not recursive) as ``s3://bucket/prefix/<name>``; returns keys."""
        c = self.client()
        keys = []
        for name in sorted(os.listdir(local)):
            path = os.path.join(local, name)
            if os.path.isfile(path):
                key = f"{prefix}/{name}"
                c.upload_file(path, bucket, key)
                keys.append(key)
        return keys

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        c = self.client()
        keys: list[str] = []
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(keys)

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def start_s3_server(timeout_s: float = 30.0) -> S3Server:
    """Start ``python -m moto.server`` on a free loopback port and wait until it answers."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).read()
            return S3Server(endpoint, proc)
        except OSError:
            time.sleep(0.2)
    stop_s3_server(S3Server(endpoint, proc))
    raise RuntimeError(f"moto server on {endpoint} did not answer in {timeout_s}s")


def stop_s3_server(server: S3Server) -> None:
    """Stop the server process this module started (by its pid / process group, nothing else)."""
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


def serve() -> Iterator[S3Server]:
    """Generator body for a fixture: start, yield, always stop."""
    server = start_s3_server()
    try:
        yield server
    finally:
        stop_s3_server(server)
