"""Session fixtures for the object-storage tests: one moto S3 server on loopback and one fault
proxy in front of it (faults cleared between tests)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from s3_testing import FaultProxy, MotoS3

_names = itertools.count()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    pytest.importorskip("s3fs", reason="needs s3fs (the s3 or dev extra)")
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _proxy(moto_s3: MotoS3) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_s3.port)
    yield proxy
    proxy.stop()


@pytest.fixture
def s3_proxy(_proxy: FaultProxy) -> Iterator[FaultProxy]:
    _proxy.clear()
    yield _proxy
    _proxy.clear()


@pytest.fixture
def bucket(moto_s3: MotoS3) -> str:
    """A fresh, empty bucket per test."""
    return moto_s3.bucket(f"test-{next(_names)}")
