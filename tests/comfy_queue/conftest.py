"""The ``fake`` fixture: start fake ComfyUI servers, stopped after the test."""
from __future__ import annotations

import signal

import pytest
from fake_comfy import FakeComfy


@pytest.fixture
def fake():
    servers = []

    def make(name="a", **kwargs):
        server = FakeComfy(name, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


TEST_TIME_LIMIT_S = 60  # no comfy_queue test may take longer; a hang is a failure, not a stuck suite


@pytest.fixture(autouse=True)
def time_limit():
    """Fail a test that runs past TEST_TIME_LIMIT_S (SIGALRM; pytest-timeout is not a dependency).

    pytest.fail raises a BaseException, so the code under test cannot swallow it as an OSError."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        pytest.fail(f"test ran past {TEST_TIME_LIMIT_S} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
