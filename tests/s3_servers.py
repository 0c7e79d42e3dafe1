"""Real servers for the object-storage tests, all on 127.0.0.1.

- `moto_server()`: moto's ThreadedMotoServer (a real S3 API over HTTP; s3fs talks to it).
- `FaultProxy`: an HTTP proxy in front of it that counts requests and, when told, fails
  every Nth matching one: 503 SlowDown, 500 InternalError, a reset connection, a
  response body cut short mid-stream, a reply later than the client's timeout ("slow"),
  or (permanent) 403 AccessDenied. It can also hold
  matching requests until released (to kill a writer mid-upload, or keep one running).
- `range_http_server(dir)`: a plain read-only HTTP server with Range support (what a
  public bucket's web endpoint looks like).
"""
from __future__ import annotations

import contextlib
import http.client
import http.server
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time

from moto.server import ThreadedMotoServer

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
FAST_RETRIES = {"retry_base_delay": 0.02, "retry_max_delay": 0.2}


@contextlib.contextmanager
def moto_server():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def storage_env(endpoint: str, **options) -> dict:
    """Environment for a process that talks to `endpoint` (credentials in AWS_*, endpoint
    and retry policy in STCN_STORAGE_OPTIONS)."""
    return {**CREDENTIALS, "STCN_STORAGE_OPTIONS": json.dumps(
        {"endpoint_url": endpoint, **FAST_RETRIES, **options})}


@contextlib.contextmanager
def storage_configured(endpoint: str, **options):
    """This process set up for `endpoint`; the environment restored afterwards."""
    from shards import storage

    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, storage.ENV_OPTIONS)}
    os.environ.update(storage_env(endpoint, **options))
    storage.configure()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.configure()


def make_bucket(name: str) -> str:
    from shards import storage

    fs, _ = storage.filesystem(f"s3://{name}")
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


# ------------------------------------------------------------------------------- proxy

class FaultProxy:
    """Forwards every request to `upstream`, recording (method, path, outcome)."""

    KINDS = ("503", "500", "reset", "cut")

    def __init__(self, upstream: str):
        self.upstream = upstream.split("://", 1)[1]
        self.log: list[tuple[str, str, str]] = []
        self.every, self.kinds, self.match = 0, self.KINDS, None
        self.hang = None  # (match(method, path), threading.Event): those requests wait on it
        self.slow_s = 3.0  # how late a "slow" fault answers
        self._lock = threading.Lock()
        self._count = 0
        self._kind = itertools.cycle(self.KINDS)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                fault = proxy._fault(self.command, self.path)
                hang = proxy.hang
                if hang is not None and hang[0](self.command, self.path):
                    proxy._record(self.command, self.path, "hang")
                    hang[1].wait(120)
                if fault in ("503", "500", "403"):
                    code = {"503": "SlowDown", "500": "InternalError",
                            "403": "AccessDenied"}[fault]
                    payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                               f"<Message>injected</Message></Error>").encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                if fault == "reset":
                    self._reset()
                    return
                if fault == "slow":  # answer only after the client's read timeout
                    time.sleep(proxy.slow_s)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive")}
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                proxy._record(self.command, self.path, str(response.status))
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                         "date", "server"):
                        self.send_header(k, v)
                if self.command == "HEAD":  # no body: the object's length stands
                    self.send_header("Content-Length", response.getheader("Content-Length", "0"))
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "cut" and len(data) > 1:
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                self.wfile.write(data)

            def _reset(self):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # a client that gave up (timeout) or a reset we made: nothing to report
        self.server.handle_error = lambda request, address: None
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def inject(self, every: int, kinds=KINDS, match=None) -> None:
        """Fail every `every`-th request for which `match(method, path)` holds (0: none),
        cycling through `kinds`."""
        with self._lock:
            self.every, self.kinds, self.match, self._count = every, kinds, match, 0
            self._kind = itertools.cycle(kinds)

    def _fault(self, method: str, path: str):
        with self._lock:
            if not self.every or (self.match and not self.match(method, path)):
                return None
            self._count += 1
            if self._count % self.every:
                return None
            kind = next(self._kind)
            if kind == "cut" and method != "GET":
                kind = "503"
            self.log.append((method, path, f"fault-{kind}"))
            return kind

    def _record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.log.append((method, path, outcome))

    def requests(self, method: str, suffix: str = "") -> int:
        """Requests of `method` forwarded to the server, path (query stripped) ending
        with `suffix`."""
        with self._lock:
            return sum(1 for m, p, o in self.log if m == method and not o.startswith("fault")
                       and o != "hang" and p.split("?", 1)[0].endswith(suffix))

    def faults(self) -> int:
        with self._lock:
            return sum(1 for _, _, o in self.log if o.startswith("fault"))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------- http

@contextlib.contextmanager
def range_http_server(directory: str):
    """Serve `directory` read-only over HTTP/1.1 with single Range requests."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, *args):
            pass

        def send_head(self):
            path = self.translate_path(self.path)
            if not os.path.isfile(path):
                self.send_error(404)
                return None
            size = os.path.getsize(path)
            start, end = 0, size - 1
            ranged = self.headers.get("Range", "").startswith("bytes=")
            if ranged:
                first, _, last = self.headers["Range"][6:].partition("-")
                start = int(first) if first else size - int(last)
                end = min(int(last), size - 1) if first and last else size - 1
            f = open(path, "rb")
            f.seek(start)
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            self._remaining = end - start + 1
            return f

        def copyfile(self, source, outputfile):
            outputfile.write(source.read(self._remaining))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def wait_for(predicate, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False
