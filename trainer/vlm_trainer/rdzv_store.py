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
"""

from __future__ import annotations

import argparse
import http.server
import logging
import signal
import threading
from datetime import timedelta

log = logging.getLogger("vlm_trainer.rdzv_store")


class StoreServer:
    """A TCPStore server plus an HTTP health endpoint."""

    def __init__(self, host: str = "0.0.0.0", port: int = 29400, health_port: int = 8081):
        import torch.distributed as dist

        self._dist = dist
        self.host, self.port = host, port
        # wait_for_workers=False: the store serves any number of agents, joining at any time.
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
        self.port = self.store.port  # resolves port 0 to the bound port
        self.health = http.server.ThreadingHTTPServer(("0.0.0.0", health_port), self._handler())
        self.health_port = self.health.server_address[1]
        self._thread = threading.Thread(target=self.health.serve_forever, name="health", daemon=True)

    def ready(self) -> bool:
        try:
            client = self._dist.TCPStore("127.0.0.1", self.port, is_master=False, timeout=timedelta(seconds=2))
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
        log.info("rendezvous store on %s:%d, health on :%d", self.host, self.port, self.health_port)
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
