"""A real S3-compatible server for tests: moto's standalone server (``moto[server]``) on 127.0.0.1,
in a process of its own, speaking the S3 protocol over HTTP. What was tested against it is moto,
not AWS."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from ray_head import free_port

ACCESS = {"key": "testing", "secret": "testing"}


def _die_with_parent() -> None:
    """In the server's process: exit when the test process does, even if it never calls stop."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: stop() is the only way
        pass


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                       str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().list_buckets()
                return
            except Exception:  # noqa: BLE001  (not listening yet)
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.1)

    @property
    def options(self) -> dict[str, Any]:
        """fsspec storage options (the fleet config's ``state_options``) for this server."""
        return {**ACCESS, "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS["key"],
                            aws_secret_access_key=ACCESS["secret"], region_name="us-east-1")

    def bucket(self, name: str) -> str:
        """A new bucket; its ``s3://`` URL."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
