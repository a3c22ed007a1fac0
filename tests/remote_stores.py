"""Real object stores on loopback for the tests: moto's S3 server, an HTTP server that honours
Range, and a TCP fault proxy that cuts connections mid-body, delays answers as a distant store
does, logs the requests and counts the bytes the server sent."""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BUCKET = "shards"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def s3_server():
    """moto's S3 server (a real S3 HTTP API) on a loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def aws_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def upload_dir(endpoint: str, folder: Path, bucket: str = BUCKET, prefix: str = "digits") -> str:
    """Every file of ``folder`` into s3://bucket/prefix/ (the bucket is created); returns that URL."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """GET with a single ``Range: bytes=a-b`` answered 206 (SimpleHTTPRequestHandler ignores Range)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        spec = self.headers.get("Range", "")
        path = self.translate_path(self.path)
        if not spec.startswith("bytes=") or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first, _, last = spec[6:].partition("-")
        first, last = int(first), min(int(last) if last else size - 1, size - 1)
        if first >= size:
            self.send_error(416)
            return None
        stream = open(path, "rb")
        stream.seek(first)
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        self._left = last - first + 1
        return stream

    def copyfile(self, source, outputfile) -> None:
        left = getattr(self, "_left", None)
        while left is None or left > 0:
            chunk = source.read(65536 if left is None else min(65536, left))
            if not chunk:
                break
            outputfile.write(chunk)
            if left is not None:
                left -= len(chunk)


@contextlib.contextmanager
def http_server(folder: Path):
    """A threaded HTTP server of ``folder`` on loopback; yields its base URL."""
    handler = functools.partial(_RangeHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def shards_on_s3(folder: Path):
    """moto's S3 server with ``folder``'s files under s3://shards/digits, a FaultProxy in front,
    and the AWS_* variables pointing there while it lasts; yields (base URL, proxy)."""
    with s3_server() as endpoint:
        saved = dict(os.environ)
        os.environ.update(aws_env(endpoint))
        base = upload_dir(endpoint, folder)
        proxy = FaultProxy(endpoint)
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        try:
            yield base, proxy
        finally:
            proxy.close()
            os.environ.clear()
            os.environ.update(saved)


@dataclass
class Request:
    """One HTTP request seen by the proxy: when (time.monotonic()), on which connection, what."""

    at: float
    connection: int
    method: str
    path: str
    range: tuple[int, int | None] | None  # the Range header's bytes=first-last, last inclusive


def _parse_request(data: bytes) -> tuple[str, str, tuple[int, int | None] | None] | None:
    """(method, path, range) when ``data`` starts an HTTP request, else None (a body, a later chunk)."""
    line, _, rest = data.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/") or parts[0] not in (b"GET", b"HEAD", b"PUT", b"POST"):
        return None
    ranged = None
    for header in rest.split(b"\r\n"):
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"range" and value.strip().startswith(b"bytes="):
            first, _, last = value.strip()[6:].partition(b"-")
            ranged = (int(first), int(last) if last else None)
    return parts[0].decode(), parts[1].decode().split("?")[0], ranged


class _Connection:
    def __init__(self, number: int):
        self.number, self.path, self.waiting = number, "", False


class FaultProxy:
    """TCP proxy on loopback in front of ``upstream`` (host:port).

    - ``sent``: bytes the server sent to the clients (what a store would bill);
    - ``requests``: every request (``Request``), in the order the proxy saw them;
    - ``latency``: seconds each answer's first byte is held back (a distant store's first-byte
      latency; per request, kept-alive connections too);
    - ``cut(n, seed, path=...)``: the next ``n`` answers (on new or kept-alive connections; to a
      request for ``path`` only, if given) are cut after a random number (1..``max_bytes``) of the
      server's bytes, mid-body for all but the smallest answers; ``cuts`` counts the cuts made;
    - ``down(seconds)``: for that long, new connections are reset at once and open ones cut.
    """

    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host.split("//")[-1], int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = self.cuts = 0
        self.requests: list[Request] = []
        self.latency = 0.0
        self._to_cut, self._rng, self._max, self._cut_path = 0, random.Random(0), 1 << 16, None
        self._connections = 0
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self, n: int, seed: int = 0, max_bytes: int = 1 << 16, path: str | None = None) -> None:
        with self._lock:
            self._to_cut, self._rng, self._max, self._cut_path = n, random.Random(seed), max_bytes, path

    def gets(self, path: str) -> list[Request]:
        """The GET requests for ``path`` (its end: a key or file name), in order."""
        return [r for r in list(self.requests) if r.method == "GET" and r.path.endswith(path)]

    def down(self, seconds: float) -> None:
        self._down_until = time.monotonic() + seconds

    def up(self) -> None:
        self._down_until = 0.0

    def close(self) -> None:
        self._closing = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self._down_until:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self._lock:
            self._connections += 1
            connection = _Connection(self._connections)
        threading.Thread(target=self._pump, args=(client, server, False, connection), daemon=True).start()
        self._pump(server, client, True, connection)

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool, connection: _Connection) -> None:
        """Copy ``source`` to ``sink``; ``answers``: the server's side, delayed, counted and cut."""
        budget = None
        try:
            while True:
                if time.monotonic() < self._down_until:
                    break
                data = source.recv(65536)
                if not data:
                    break
                if not answers and (request := _parse_request(data)) is not None:
                    connection.path, connection.waiting = request[1], True
                    self.requests.append(Request(time.monotonic(), connection.number, *request))
                if answers and connection.waiting:  # an answer's first bytes: the store's latency
                    connection.waiting = False
                    if self.latency:
                        time.sleep(self.latency)
                if answers and budget is None and self._to_cut > 0:  # kept-alive connections too
                    with self._lock:
                        if self._to_cut > 0 and (self._cut_path is None or connection.path.endswith(self._cut_path)):
                            self._to_cut -= 1
                            budget = self._rng.randint(1, self._max)
                # Counted before they are passed on: a reader that has its bytes sees them counted.
                if budget is not None and len(data) >= budget:
                    with self._lock:
                        self.sent += budget
                        self.cuts += 1
                    sink.sendall(data[:budget])
                    break
                if budget is not None:
                    budget -= len(data)
                if answers:
                    with self._lock:
                        self.sent += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
