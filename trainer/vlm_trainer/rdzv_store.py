"""`vlmpretrain rendezvous-store`: the c10d rendezvous store, outside the workers.

torchrun's c10d rendezvous keeps its TCPStore inside the agent whose address is the
endpoint (worker-0 in a PyTorchJob): losing that node ends every other agent within a
second. Run the store as its own process (a Deployment + Service per stage in a cluster,
a subprocess locally) and start agents with `rdzv_conf is_host=false`: any node may die.

The store holds only rendezvous state. A restarted store starts empty; the agents'
keep-alives fail, they re-rendezvous against the new store, and training resumes from
the last committed checkpoint (measured in tests/test_rdzv_store.py).

Health: GET /healthz answers while the process lives; GET /readyz answers 200 only when
a client round trip (set + get) through the store succeeds.

Both ports bind to `--host` only (default every address, IPv4 and IPv6: a pod is reached
on its pod IP; tests bind 127.0.0.1). Who may connect is the run's NetworkPolicy's business
(README: trust model): only the run's own pods reach the store port; the kubelet's probes
come from the node.
"""

from __future__ import annotations

import argparse
import http.server
import logging
import signal
import socket
import threading
from datetime import timedelta

log = logging.getLogger("vlm_trainer.rdzv_store")


ALL = ""  # bind every address: IPv4 and IPv6 where the kernel has IPv6


def _local_address(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    if host in (ALL, "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on exactly `host` (ALL: every address, dual-stack)."""
    if host in (ALL, "::"):
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            addr: tuple = ("::", port)
        except OSError:
            if host == "::":
                raise
            sock, addr = socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port)
    else:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # a restarted store takes its port back while the old connections sit in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


class _HealthServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer on a socket bound by `listen` (any family, exactly its address)."""

    def __init__(self, sock: socket.socket, handler) -> None:
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()


class StoreServer:
    """A TCPStore server plus an HTTP health endpoint, both bound to `host` only.

    TCPStore binds every address whatever host it is given (torch 2.x), so the store's
    listening socket is made here, on `host`, and handed over (`master_listen_fd`)."""

    def __init__(self, host: str = ALL, port: int = 29400, health_port: int = 8081):
        import torch.distributed as dist

        self._dist = dist
        self.host = host
        self._sock = listen(host, port)
        self.port = self._sock.getsockname()[1]  # resolves port 0 to the bound port
        # wait_for_workers=False: the store serves any number of agents, joining at any time.
        self.store = dist.TCPStore(_local_address(host), self.port, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=30), master_listen_fd=self._sock.fileno(),
                                   use_libuv=True)
        self.health = _HealthServer(listen(host, health_port), self._handler())
        self.health_port = self.health.server_address[1]
        self._thread = threading.Thread(target=self.health.serve_forever, name="health", daemon=True)

    def ready(self) -> bool:
        try:
            client = self._dist.TCPStore(_local_address(self.host), self.port, is_master=False,
                                         timeout=timedelta(seconds=2))
            client.set("vlm/readyz", "1")
            return client.get("vlm/readyz") == b"1"
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path == "/healthz":
                    ok = True
                elif self.path == "/readyz":
                    ok = server.ready()
                else:
                    self.send_error(404)
                    return
                body = b"ok\n" if ok else b"store not answering\n"
                self.send_response(200 if ok else 503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # probes every few seconds: keep logs quiet
                pass

        return Handler

    def start(self) -> "StoreServer":
        self._thread.start()
        log.info("rendezvous store on %s:%d, health on port %d (same address)", self.host or "*", self.port,
                 self.health_port)
        return self

    def stop(self) -> None:
        self.health.shutdown()
        self.health.server_close()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = StoreServer(args.host, args.port, args.health_port).start()
    # Print the bound ports (port 0 = any): the local runner reads this line.
    print(f"rendezvous-store listening port={server.port} health_port={server.health_port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0
