"""A local S3 server for tests and benchmarks: moto's standalone server on 127.0.0.1, patched.

moto 5.x serves a ranged GET by copying the whole object out of its buffer and then slicing,
and spools objects over ~5 MB to temporary files: against it, ranged reads look slow and
whole-object downloads look best, the opposite of real S3.  ``start()`` patches moto (in this
process, where its server thread runs) so that objects stay in memory and a range is served by
slicing a view of that memory: only the bytes asked for are copied.

The patch also counts the body bytes of every GET the server sends (``ServerStats``) and can
refuse or break requests for chosen keys (``deny``, ``fail_next``) to test error paths.
"""

from __future__ import annotations

import io
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

PATCH_NOTE = "moto patched: objects kept in memory, ranged GETs served from a view (no whole-object copy)"


@dataclass
class ServerStats:
    get_bytes: int = 0
    gets: int = 0
    deny: set[str] = field(default_factory=set)  # keys answered with 403 AccessDenied
    fail_next: dict[str, int] = field(default_factory=dict)  # key -> number of 503s still to send
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.get_bytes = 0
            self.gets = 0


STATS = ServerStats()
_patched = False


def _patch_moto() -> None:
    global _patched
    if _patched:
        return
    from moto.s3 import models, responses

    def get_value(self: Any) -> Any:
        buf = self._value_buffer
        if isinstance(buf, io.BytesIO):
            return buf.getbuffer()  # a view: no copy of the object per request
        buf.seek(0)
        return buf.read()

    def set_value(self: Any, new_value: Any) -> None:
        if isinstance(new_value, str):
            new_value = new_value.encode()
        self._value_buffer = io.BytesIO(bytes(new_value))  # a fresh buffer: views of the old one stay valid
        self.contentsize = len(new_value)

    models.FakeKey.value = property(get_value, set_value)  # type: ignore[assignment]
    original = responses.S3Response.key_response

    def key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        key = full_url.split("?", 1)[0].split("/", 4)[-1] if request.method in ("GET", "HEAD") else ""
        if key in STATS.deny:
            body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            return 403, {"content-type": "application/xml"}, body
        with STATS.lock:
            left = STATS.fail_next.get(key, 0)
            if left:
                STATS.fail_next[key] = left - 1
        if left:
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            return 503, {"content-type": "application/xml"}, body
        status, hdrs, body = original(self, request, full_url, headers)
        if isinstance(body, memoryview):
            body = body.tobytes()  # only the range asked for (or the whole object without Range)
        if request.method == "GET" and isinstance(body, bytes) and status in (200, 206):
            with STATS.lock:
                STATS.get_bytes += len(body)
                STATS.gets += 1
        return status, hdrs, body

    responses.S3Response.key_response = key_response  # type: ignore[method-assign]
    _patched = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """moto's S3 on ``127.0.0.1:<free port>`` with credentials and endpoint set for boto3/s3fs."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        _patch_moto()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.stats = STATS

    def start(self) -> S3Server:
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self._old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import fsspec

        fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = self.endpoint
        fsspec.config.conf["s3"]["skip_instance_cache"] = False
        self.server.start()
        return self

    def stop(self) -> None:
        import fsspec

        self.server.stop()
        fsspec.config.conf.get("s3", {}).pop("endpoint_url", None)
        for k, v in self._old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name
