"""S3 test helpers: fake credentials, a moto ThreadedMotoServer endpoint, buckets, and a
fault-injecting HTTP proxy in front of moto (500 / 503 SlowDown / dropped connections /
held requests for chosen S3 operations). Fixtures using them live in tests/conftest.py."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

MANIFEST_NAME = "COMMITTED"
FAKE_ACCESS_KEY = "fake-access-key"
FAKE_SECRET = "fake-secret-" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_aws_env() -> dict:
    """Environment for boto3 against moto (also for worker subprocesses)."""
    return {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


AWS_ENV_UNSET = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


def new_bucket(endpoint: str) -> str:
    import boto3

    name = "ckpt-" + uuid.uuid4().hex[:12]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


_ERR_XML = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


def s3_op(method: str, path: str, query: dict) -> str:
    if method == "PUT" and "partNumber" in query:
        return "UploadPart"
    if method == "POST" and "uploads" in query:
        return "CreateMultipartUpload"
    if method == "POST" and "uploadId" in query:
        return "CompleteMultipartUpload"
    if method == "PUT" and path.endswith("/" + MANIFEST_NAME):
        return "PutCommitted"
    if method == "PUT" and path.count("/") >= 2:
        return "PutObject"
    return method


class FaultProxy:
    """HTTP proxy to moto answering 500 / 503 SlowDown / a dropped connection for the
    first K requests of the chosen S3 operations."""

    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.up = (u.hostname, u.port)
        self.rules: list[list] = []  # [op, action, remaining]
        self.injected: list[tuple[str, str]] = []
        self.seen: list[str] = []
        self.held: list[str] = []
        self.release = threading.Event()
        self.hold_seconds = 120.0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def finish(self):
                try:
                    super().finish()
                except OSError:  # the socket was reset on purpose
                    pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        n = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if n == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(n)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                u = urlsplit(self.path)
                q = parse_qs(u.query, keep_blank_values=True)
                op = s3_op(self.command, u.path, q)
                action = None
                with proxy.lock:
                    proxy.seen.append(op)
                    for rule in proxy.rules:
                        if rule[0] == op and rule[2] != 0:
                            rule[2] -= 1
                            action = rule[1]
                            proxy.injected.append((op, action))
                            break
                if action == "hold":  # keep the request waiting (a stalled upload) until released
                    proxy.held.append(op)
                    proxy.release.wait(proxy.hold_seconds)
                    self.close_connection = True
                    return
                if action == "drop":  # read a little of the body, then reset the connection
                    n = int(self.headers.get("Content-Length") or 0)
                    self.rfile.read(min(n, 64 * 1024))
                    self.close_connection = True
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    return
                body = self._body()
                if action in (500, 503):
                    code, msg = _ERR_XML[action]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>{msg}</Message><RequestId>fault</RequestId></Error>").encode()
                    self.send_response(action)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "expect",
                                                "content-length")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.up, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length",
                                         "server", "date"):
                        self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                    self.end_headers()
                else:
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(self, op: str, action, times: int = 1):
        """times=-1: forever."""
        with self.lock:
            self.rules.append([op, action, times])

    def wait_held(self, timeout: float = 60.0) -> bool:
        """Until a request is being held."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.held:
                return True
            time.sleep(0.02)
        return False

    def clear(self):
        with self.lock:
            self.rules.clear()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
