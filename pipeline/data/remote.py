"""Shards in object storage (``s3://``, ``http(s)://``) read by byte range, resumed at the exact byte.

``RangeFile`` is a seekable, read-only file over one object, or a window ``[begin, end)`` of it:
one streaming ranged GET feeds sequential reads, a short forward seek reads through the open
body, anything else opens a new ranged GET where the reader is. The tar reader walks it as it
walks a local file, so a slice (or a resume) that starts at a sample's byte offset reads from there.

A read that fails mid-object (connection reset or refused, timeout, 5xx, a short body) is
retried from the byte where it stopped, with exponential backoff and full jitter, so the stream
goes on with the same bytes: the same samples, each once. Giving up takes ``io_retries`` failed
tries in a row, or ``io_timeout_s`` since the first of them; then ``StoreUnavailable`` (exit 75:
the store may come back, Slurm requeues) names the shard, the byte offset and the last error.
A missing bucket or key and a refused credential are a ``DataError`` (exit 2) at once: retrying
does not fix them.

The clients are boto3's (credentials and endpoint as AWS's own tools take them: the standard
variables and files, ``AWS_ENDPOINT_URL`` for S3-compatible stores) and ``requests`` for plain
http(s). Neither retries by itself here: the bounds above are the only ones. A client is made
per process (DataLoader workers fork), never shared across a fork.
"""
from __future__ import annotations

import io
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from .errors import DataError, StoreUnavailable

REMOTE_SCHEMES = ("s3", "http", "https")
SEEK_THROUGH = 1 << 20  # a forward seek shorter than this reads through the open body (no new request)
PRIME_CHUNK = 64 << 10  # prime() reads in chunks this size: a cut connection loses at most one of them
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.05, 5.0
_jitter = random.Random(os.urandom(8))  # never the global RNG: workers seed it for augmentation


def is_remote(url: str) -> bool:
    return urlparse(url).scheme in REMOTE_SCHEMES


@dataclass(frozen=True)
class IoOptions:
    """How remote shards are read (``data.io_retries``, ``data.io_timeout_s``, ``data.cache_*``,
    ``data.io_prefetch``)."""

    retries: int = 10
    timeout_s: float = 120.0
    cache_dir: str | None = None
    cache_limit_gb: float = 0.0  # 0: no limit
    prefetch: bool = True  # a worker opens its next remote piece while it reads the current one (prefetch.py)
    # The AWS_* variables of the process that resolved the shards: DataLoader workers come from a
    # fork server started earlier, with the environment of that moment, and must use the same store.
    aws_env: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg) -> IoOptions:
        aws = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
        return cls(cfg.io_retries, cfg.io_timeout_s, cfg.cache_dir, cfg.cache_limit_gb, cfg.io_prefetch, aws)


@dataclass(frozen=True)
class RemoteShard:
    """A remote shard as the reader needs it: the byte offset of every sample's first header and
    the object's size (from the manifest, where make_shards wrote them), and the I/O options."""

    url: str
    offsets: tuple[int, ...] | None
    size: int | None
    io: IoOptions

    def window(self, start: int, stop: int) -> tuple[int, int | None]:
        """Bytes [begin, end) holding samples [start, stop); (0, None) without offsets."""
        if self.offsets is None:
            return 0, None
        begin = self.offsets[start] if start < len(self.offsets) else self.size
        end = self.offsets[stop] if stop < len(self.offsets) else self.size
        return begin, end


class _Retry(Exception):
    """A failure that a new request from the same byte may get past."""


class Cancelled(Exception):
    """A prefetch was called off (its piece will not be read): no further request or retry."""


# ---- clients ------------------------------------------------------------------------------------

_clients: dict = {}
_clients_lock = threading.Lock()  # the reader and its prefetch thread may ask for the first client at once


def _new_clients_lock() -> None:
    # A child forked while a prefetch thread made a client would inherit the lock held, for ever.
    global _clients_lock
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_clients_lock)


def _quiet_urllib3() -> None:
    # A connection cut inside the headers makes urllib3 log a warning with a traceback; the
    # reader retries it and says so itself when it gives up.
    logging.getLogger("urllib3.connection").setLevel(logging.ERROR)


def _s3_client(options: IoOptions):
    key = ("s3", os.getpid(), options.timeout_s, options.aws_env)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = _new_s3_client(options)
    return _clients[key]


def _new_s3_client(options: IoOptions):
    _quiet_urllib3()
    import boto3
    from botocore.config import Config

    env = dict(options.aws_env) or {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    config = Config(connect_timeout=options.timeout_s, read_timeout=options.timeout_s,
                    retries={"total_max_attempts": 1})  # our retries resume at the byte; no second layer
    session = boto3.session.Session(
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"), aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=env.get("AWS_SESSION_TOKEN"), profile_name=env.get("AWS_PROFILE"),
        region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))
    return session.client("s3", config=config, endpoint_url=env.get("AWS_ENDPOINT_URL_S3")
                          or env.get("AWS_ENDPOINT_URL"))


def _http_session():
    key = ("http", os.getpid())
    with _clients_lock:
        if key not in _clients:
            _quiet_urllib3()
            import requests

            _clients[key] = requests.Session()
    return _clients[key]


def _bucket_key(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/")


_USER_CODES = {"NoSuchBucket": "the bucket does not exist", "NoSuchKey": "the object does not exist",
               "404": "the object does not exist", "403": "access denied",
               "AccessDenied": "access denied", "InvalidAccessKeyId": "the access key is refused",
               "SignatureDoesNotMatch": "the secret key is refused", "InvalidBucketName": "invalid bucket name"}


def _classify(error: BaseException, url: str) -> BaseException:
    """The error as this module raises it: DataError (fix the input), _Retry (try again)."""
    from botocore.exceptions import ClientError, NoCredentialsError, ParamValidationError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _USER_CODES or status in (401, 403, 404):
            what = _USER_CODES.get(code, f"HTTP {status} {code}")
            return DataError(f"cannot read '{url}': {what}; check the URL (data.train_shards/val_shards/manifest) "
                             "and the AWS credentials and endpoint (AWS_ENDPOINT_URL, AWS_PROFILE)")
        return _Retry(f"{code or status}: {error}")
    if isinstance(error, NoCredentialsError):
        return DataError(f"cannot read '{url}': no AWS credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                         "or AWS_PROFILE")
    if isinstance(error, ParamValidationError):
        return DataError(f"cannot read '{url}': {error}; check the s3://bucket/key URL")
    return _Retry(f"{type(error).__name__}: {error}")


def _open_s3(url: str, begin: int, end: int | None, options: IoOptions):
    """(body, total object size) of a ranged GET."""
    bucket, key = _bucket_key(url)
    if not bucket or not key:
        raise DataError(f"'{url}' is not an s3://bucket/key URL")
    try:
        response = _s3_client(options).get_object(
            Bucket=bucket, Key=key, Range=f"bytes={begin}-{'' if end is None else end - 1}")
    except Exception as error:  # noqa: BLE001 - classified: user error or retry
        raise _classify(error, url) from None
    try:
        ranged = response.get("ContentRange", "")
        total = int(ranged.rsplit("/", 1)[1]) if "/" in ranged else begin + int(response["ContentLength"])
    except (KeyError, ValueError) as error:  # headers cut short
        response["Body"].close()
        raise _Retry(f"incomplete response headers ({type(error).__name__}: {error})") from None
    return response["Body"], total


def _open_http(url: str, begin: int, end: int | None, options: IoOptions):
    timeout_s = options.timeout_s
    import requests

    headers = {"Range": f"bytes={begin}-{'' if end is None else end - 1}", "Accept-Encoding": "identity"}
    try:
        response = _http_session().get(url, headers=headers, stream=True, timeout=(timeout_s, timeout_s))
    except requests.RequestException as error:
        raise _Retry(f"{type(error).__name__}: {error}") from None
    if response.status_code in (401, 403, 404, 410):
        response.close()
        raise DataError(f"cannot read '{url}': HTTP {response.status_code} {response.reason}; check the URL")
    if response.status_code == 416:  # the range starts at or past the end: an empty read
        response.close()
        return io.BytesIO(b""), begin
    if response.status_code not in (200, 206):
        response.close()
        raise _Retry(f"HTTP {response.status_code} {response.reason}")
    body = response.raw
    if response.status_code == 200:  # the server ignored Range: read through to the byte we want
        total = int(response.headers.get("Content-Length", 0)) or None
        skipped = 0
        while skipped < begin:
            chunk = body.read(min(begin - skipped, 1 << 20))
            if not chunk:
                raise _Retry("short body before the range start")
            skipped += len(chunk)
        return body, total
    ranged = response.headers.get("Content-Range", "")
    total = int(ranged.rsplit("/", 1)[1]) if "/" in ranged and not ranged.endswith("*") else None
    return body, total


def _open(url: str, begin: int, end: int | None, options: IoOptions):
    if urlparse(url).scheme == "s3":
        return _open_s3(url, begin, end, options)
    return _open_http(url, begin, end, options)


def _read_body(body, n: int) -> bytes:
    try:
        return body.read(n)
    except Exception as error:  # noqa: BLE001 - reset, timeout, incomplete read: all resumed at the byte
        raise _Retry(f"{type(error).__name__}: {error}") from None


# ---- the file -------------------------------------------------------------------------------------

class RangeFile(io.RawIOBase):
    """Seekable read-only file over ``url`` (bytes [begin, end) of it; end None: the object's end).

    ``requests`` counts the ranged GETs opened, ``retries`` the failures got past. ``stop``: an
    event that, once set, makes the next request or backoff raise ``Cancelled`` (a prefetch's).
    """

    def __init__(self, url: str, options: IoOptions, *, begin: int = 0, end: int | None = None,
                 stop: threading.Event | None = None):
        super().__init__()
        self.url, self.options, self.begin, self.end, self.stop = url, options, begin, end, stop
        self.pos = begin
        self._body, self._body_pos, self._size = None, 0, None
        self._last, self._last_at = b"", 0  # the last chunk read: a short seek back (a peek) needs no request
        self.requests = self.retries = 0
        self.last_error = ""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self.pos
        elif whence == io.SEEK_END:
            offset += self._limit()
        self.pos = max(self.begin, offset)
        return self.pos

    def _limit(self) -> int:
        """The end of what this file reads (the window's end, else the object's size)."""
        if self.end is not None:
            return self.end
        if self._size is None:
            self._retrying(lambda: self._reopen(self.pos))
        return self._size

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` from the current position; fewer bytes only at the end."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            if self.end is not None and self.pos >= self.end:
                break
            if self._size is not None and self.pos >= self._size:
                break
            if self._last_at <= self.pos < self._last_at + len(self._last):
                chunk = self._last[self.pos - self._last_at:self.pos - self._last_at + len(view) - done]
            else:
                chunk = self._retrying(lambda: self._read_some(len(view) - done))
                self._last, self._last_at = chunk, self.pos
            if not chunk:
                break  # the object's end
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
            self.pos += len(chunk)
        return done

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._limit() - self.pos
        buffer = bytearray(max(0, size))
        return bytes(buffer[:self.readinto(buffer)])

    def prime(self, nbytes: int) -> None:
        """Open the GET and read the first ``nbytes`` (fewer at the end) now, with the usual
        retries; the reads that follow start from memory, then go on through the open body."""
        head = bytearray()
        while len(head) < nbytes and (chunk := self.read(min(PRIME_CHUNK, nbytes - len(head)))):
            head += chunk
        self._last, self._last_at = bytes(head), self.begin  # what readinto serves without a request
        self.seek(self.begin)

    def _read_some(self, want: int) -> bytes:
        if self._body is None or self._body_pos > self.pos or self.pos - self._body_pos > SEEK_THROUGH:
            self._reopen(self.pos)
        while self._body_pos < self.pos:  # a short forward seek: read through the open body
            skipped = _read_body(self._body, min(self.pos - self._body_pos, 1 << 16))
            if not skipped:
                raise _Retry(f"short body at byte {self._body_pos}")
            self._body_pos += len(skipped)
        stop = self.end if self.end is not None else self._size
        if stop is not None:
            want = min(want, stop - self.pos)
        chunk = _read_body(self._body, want)
        if not chunk and (stop is None or self.pos < stop):
            raise _Retry(f"short body at byte {self.pos}")  # the connection ended before the range did
        self._body_pos += len(chunk)
        return chunk

    def _reopen(self, at: int) -> None:
        self._drop_body()
        self.requests += 1
        self._body, total = _open(self.url, at, self.end, self.options)
        self._body_pos = at
        if total is not None:
            self._size = total

    def _retrying(self, operation):
        """``operation()``, retried from the current byte with backoff and jitter while the bounds allow."""
        failures, first = 0, None
        while True:
            if self.stop is not None and self.stop.is_set():
                raise Cancelled(f"reading '{self.url}' at byte {self.pos} was called off")
            try:
                return operation()
            except _Retry as error:
                self._drop_body()
                now = time.monotonic()
                first = now if first is None else first
                failures += 1
                self.retries += 1
                self.last_error = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
                if failures > self.options.retries or now - first > self.options.timeout_s:
                    raise StoreUnavailable(
                        f"gave up reading shard '{self.url}' at byte {self.pos} after {failures} failed tries "
                        f"in {now - first:.1f} s (data.io_retries={self.options.retries}, "
                        f"data.io_timeout_s={self.options.timeout_s:g}); last error: {self.last_error}") from None
                delay = _jitter.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (failures - 1)))
                if self.stop is None:
                    time.sleep(delay)  # full jitter: many workers do not retry in step
                elif self.stop.wait(delay):
                    raise Cancelled(f"reading '{self.url}' at byte {self.pos} was called off") from None

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close: nothing to keep
                pass

    def close(self) -> None:
        self._drop_body()
        super().close()


def read_object(url: str, options: IoOptions = IoOptions()) -> bytes:
    """A whole (small) object, e.g. a manifest; errors as RangeFile's."""
    with RangeFile(url, options) as stream:
        return stream.read()


def object_size(url: str, options: IoOptions = IoOptions()) -> int:
    """The object's size in bytes, from a HEAD request; a missing object is a DataError."""
    def head() -> int:
        if urlparse(url).scheme == "s3":
            bucket, key = _bucket_key(url)
            try:
                return int(_s3_client(options).head_object(Bucket=bucket, Key=key)["ContentLength"])
            except Exception as error:  # noqa: BLE001 - classified: user error or retry
                raise _classify(error, url) from None
        import requests

        try:
            response = _http_session().head(url, timeout=(options.timeout_s, options.timeout_s),
                                            allow_redirects=True, headers={"Accept-Encoding": "identity"})
        except requests.RequestException as error:
            raise _Retry(f"{type(error).__name__}: {error}") from None
        if response.status_code in (401, 403, 404, 410):
            raise DataError(f"cannot read '{url}': HTTP {response.status_code} {response.reason}; check the URL")
        if response.status_code != 200 or "Content-Length" not in response.headers:
            raise _Retry(f"HTTP {response.status_code} {response.reason}")
        return int(response.headers["Content-Length"])

    with RangeFile(url, options) as stream:
        return stream._retrying(head)


def upload_file(path: str, url: str, options: IoOptions = IoOptions()) -> None:
    """Put a local file at ``s3://bucket/key`` (boto3's managed, multipart upload)."""
    if urlparse(url).scheme != "s3":
        raise DataError(f"cannot write to '{url}': only s3:// URLs (and local paths) can be written")
    bucket, key = _bucket_key(url)
    try:
        _s3_client(options).upload_file(path, bucket, key)
    except Exception as error:  # noqa: BLE001 - a missing bucket or refused credential: one line
        classified = _classify(error.__cause__ or error.__context__ or error, url)
        raise (classified if isinstance(classified, DataError)
               else DataError(f"cannot write '{url}': {classified}")) from None


def exists(url: str, options: IoOptions = IoOptions()) -> bool:
    """Whether the object is there (a missing bucket is a DataError)."""
    try:
        object_size(url, options)
        return True
    except DataError as error:
        if "the object does not exist" in str(error) or "HTTP 404" in str(error):
            return False
        raise
