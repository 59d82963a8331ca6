"""A real S3-compatible server on loopback (moto's ThreadedMotoServer) and a fault-injecting
HTTP proxy to put between it and the client.

The proxy forwards every request to the server unless a :class:`Fault` rule matches it; then,
by rule: answer with an S3 error status (5xx) without forwarding, close the connection without
answering (before or after forwarding, so a write may or may not have happened), send a truncated
body, or flip a byte of the body (with checksum headers removed, so only logitcache's own sha256
can notice). Rules match by method and a substring of the path, may let the first ``skip``
matches through, and fire ``times`` times.
"""

from __future__ import annotations

import http.client
import itertools
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


def _checksum_header(name: str) -> bool:
    n = name.lower()
    return n.startswith("x-amz-checksum") or n in ("etag", "content-md5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoS3:
    """moto's S3 server on 127.0.0.1 at a free port; ``bucket(name)`` creates a bucket."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [o["Key"] for p in pages for o in p.get("Contents", [])]

    def stop(self) -> None:
        self.server.stop()


@dataclass
class Fault:
    """``action``: an HTTP status (e.g. 503), "drop" (close, nothing forwarded), "drop_after"
    (forward, then close without answering), "truncate" or "corrupt" (on the response body)."""

    method: str
    path: str
    action: int | str
    times: int = 1
    skip: int = 0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        if method != self.method or self.path not in path or self.fired >= self.times:
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        self.fired += 1
        return True


class FaultProxy:
    """An HTTP/1.1 proxy on loopback in front of ``upstream_port``; see the module docstring."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are separate writes

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._match(self.command, self.path)
                action = fault.action if fault else None
                if isinstance(action, int):
                    code = "ServiceUnavailable" if action == 503 else "InternalError"
                    msg = f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
                    self._reply(action, {"Content-Type": "application/xml"}, msg.encode())
                    return
                if action == "drop":
                    self.close_connection = True
                    return
                status, headers, data = self._forward(body)
                if action == "drop_after":
                    self.close_connection = True
                    return
                if action == "corrupt" and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                    headers = [
                        (k, v) for k, v in headers if not k.lower().startswith("x-amz-checksum")
                    ]
                    headers = [
                        (k, v) for k, v in headers if k.lower() not in ("etag", "content-md5")
                    ]
                if action == "truncate" and len(data) > 1:
                    self.send_response(status)
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._reply(status, dict(headers), data)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Content-Length"] = str(len(body))
                headers.pop("Expect", None)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
                if self.command == "HEAD":  # no body, but the object's length matters
                    out.append(("X-Proxy-Length", resp.getheader("Content-Length") or "0"))
                conn.close()
                return resp.status, out, data

            def _reply(self, status: int, headers: Any, data: bytes) -> None:
                self.send_response(status)
                items = dict(headers.items() if isinstance(headers, dict) else headers)
                length = items.pop("X-Proxy-Length", str(len(data)))
                for k, v in items.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _match(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for f in self.faults:
                if f.matches(method, path):
                    return f
        return None

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and path in p)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_options(endpoint: str, fast: bool = True) -> dict[str, Any]:
    """fsspec options for s3fs against ``endpoint``. ``fast``: the client's own retries off and
    short timeouts, so logitcache's retry layer is what the fault tests exercise."""
    opts: dict[str, Any] = {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }
    if fast:
        opts["config_kwargs"] = {
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 2,
            "read_timeout": 5,
        }
        opts["logitcache_backoff_s"] = 0.01
    return opts


# -- fixtures (import them into a test module: ``from s3_testing import bucket, ...``) ---------

_names = itertools.count()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    pytest.importorskip("s3fs", reason="needs s3fs (the s3 or dev extra)")
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fault_proxy(moto_s3: MotoS3) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_s3.port)
    yield proxy
    proxy.stop()


@pytest.fixture
def s3_proxy(fault_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The fault proxy with no faults and an empty request log."""
    fault_proxy.clear()
    yield fault_proxy
    fault_proxy.clear()


@pytest.fixture
def bucket(moto_s3: MotoS3) -> str:
    """A fresh, empty bucket per test."""
    return moto_s3.bucket(f"test-{next(_names)}")
