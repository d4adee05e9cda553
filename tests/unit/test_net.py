"""The one reachability probe (metadist.net) that the Ray connection, submit and tracking ask first."""

from __future__ import annotations

import socket

import pytest

from metadist.net import unreachable

from ..conftest import free_port


@pytest.fixture
def listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(name="free_port")
def _free_port():
    return free_port()


def test_every_address_form_reaches_a_listening_port(listening):
    for address in (f"127.0.0.1:{listening}", f"ray://127.0.0.1:{listening}", f"http://127.0.0.1:{listening}/",
                    f"http://localhost:{listening}/api"):
        assert unreachable(address) is None, address
    assert unreachable("http://127.0.0.1", default_port=listening) is None  # no port: the caller's default


def test_a_silent_port_says_where_and_why(free_port):
    silent = unreachable(f"ray://127.0.0.1:{free_port}")
    assert (silent.host, silent.port) == ("127.0.0.1", free_port) and silent.why
    assert str(silent) == f"nothing answers at 127.0.0.1:{free_port} ({silent.why})"
    assert unreachable("127.0.0.1", default_port=free_port).port == free_port


@pytest.mark.parametrize("address", ["127.0.0.1", "host:port", "http://:8265", "ray://"])
def test_an_address_without_host_or_port_is_a_value_error(address):
    with pytest.raises(ValueError, match="names no host and port"):
        unreachable(address)
