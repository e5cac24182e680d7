"""Fixtures of the service tests (tests/server/test_service*.py): one in-process GradientServer on the
inline engine per test module, and a client of it."""

from __future__ import annotations

import pytest

from gradserve.client.remote import Client
from gradserve.server.inline import InlineEngine
from gradserve.server.limits import Limits
from serving import serving


@pytest.fixture(scope="module")
def server():
    with serving(InlineEngine, limits=Limits(max_concurrent_jobs=4)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=30) as c:
        yield c
