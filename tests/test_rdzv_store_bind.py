"""`vlmpretrain rendezvous-store --host H`: both ports (c10d store and health) bind H only.

TCPStore itself binds every address whatever host it is given, so a store told to stay
on 127.0.0.1 would still take connections on every other address; the store hands
TCPStore a socket bound to H instead. Linux routes all of 127.0.0.0/8 to loopback, so
127.0.0.2 is "another address of this machine" here.
"""

from __future__ import annotations

import socket
import urllib.request
from datetime import timedelta

import pytest

dist = pytest.importorskip("torch.distributed")

from vlm_trainer.rdzv_store import StoreServer  # noqa: E402


def _reachable(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def store():
    servers = []

    def start(host: str) -> StoreServer:
        servers.append(StoreServer(host, 0, 0).start())
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def test_every_port_binds_only_the_given_address(store):
    s = store("127.0.0.1")
    assert s.health.server_address[0] == "127.0.0.1"
    for port in (s.port, s.health_port):
        assert _reachable("127.0.0.1", port)
        assert not _reachable("127.0.0.2", port), f"port {port} answers on an address it was not given"
    # it still works: a client round trip and the probes
    client = dist.TCPStore("127.0.0.1", s.port, is_master=False, timeout=timedelta(seconds=5))
    client.set("k", "v")
    assert client.get("k") == b"v"
    assert s.ready()
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(f"http://127.0.0.1:{s.health_port}{path}", timeout=5) as resp:
            assert resp.status == 200


def test_default_binds_every_address(store):
    s = store("")
    for port in (s.port, s.health_port):
        assert _reachable("127.0.0.1", port) and _reachable("127.0.0.2", port)
    assert s.ready()


def test_the_cli_passes_the_address_through():
    from vlm_api import cli

    parser = cli.build_parser()
    args = parser.parse_args(["rendezvous-store", "--host", "127.0.0.1", "--port", "0", "--health-port", "0"])
    assert (args.host, args.port, args.health_port) == ("127.0.0.1", 0, 0)
    assert parser.parse_args(["rendezvous-store"]).host == ""
