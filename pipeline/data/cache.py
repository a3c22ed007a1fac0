"""The node-local shard cache (``data.cache_dir``): remote shards fetched whole, once per node.

- A shard is fetched into ``<cache_dir>/<hash of its URL>-<name>`` under a temporary name, then
  renamed: a reader never sees half a file.
- One fetch at a time per shard on a node: ranks and workers take an exclusive ``flock`` on the
  shard's ``.lock`` file, and whoever gets it second finds the file there and reads it.
- A cached file is used only when its size is the manifest's (else the object's): a truncated
  file (a crash while copying it in by hand, a full disk) is fetched again.
- ``data.cache_limit_gb`` evicts the least recently used shards (by modification time, which
  every use refreshes) after each fetch; the shard just fetched stays. A reader that still has
  an evicted file open keeps reading it (Linux frees it on close).
- A worker's prefetch thread (``prefetch.py``) fetches the next shard while the worker reads the
  current one, under the same lock, and opens the file at once: an eviction between the fetch
  and the read cannot take it away.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from contextlib import contextmanager

from .remote import RangeFile, RemoteShard, object_size

log = logging.getLogger(__name__)

CHUNK = 4 << 20


def cache_path(shard: RemoteShard) -> str:
    digest = hashlib.sha1(shard.url.encode()).hexdigest()[:16]
    return os.path.join(shard.io.cache_dir, f"{digest}-{os.path.basename(shard.url) or 'shard'}")


@contextmanager
def _locked(path: str):
    with open(path + ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_whole(path: str, size: int) -> bool:
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False


def cached_shard(shard: RemoteShard, *, stop: threading.Event | None = None) -> str:
    """The path of the shard's complete local copy, fetched first where it is missing or truncated.
    ``stop``: set, it calls off a fetch in progress (a prefetch's; ``remote.Cancelled``)."""
    os.makedirs(shard.io.cache_dir, exist_ok=True)
    path = cache_path(shard)
    size = shard.size if shard.size is not None else object_size(shard.url, shard.io)
    if not _is_whole(path, size):
        with _locked(path):
            if not _is_whole(path, size):  # another rank or worker may have fetched it meanwhile
                if os.path.exists(path):
                    log.warning("cached shard %s is %d bytes, the manifest says %d: fetching it again",
                                path, os.path.getsize(path), size)
                _fetch(shard, path, size, stop)
                evict(shard.io.cache_dir, shard.io.cache_limit_gb, keep=path)
    os.utime(path)  # a use: the least recently used shards are evicted first
    return path


def _fetch(shard: RemoteShard, path: str, size: int, stop: threading.Event | None) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"  # (the lock keeps a process's threads apart too: one fd each)
    try:
        with RangeFile(shard.url, shard.io, end=size, stop=stop) as source, open(tmp, "wb") as out:
            buffer = bytearray(CHUNK)
            while n := source.readinto(buffer):
                out.write(memoryview(buffer)[:n])
        if os.path.getsize(tmp) != size:
            raise OSError(f"fetched {os.path.getsize(tmp)} of {size} bytes of {shard.url}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def evict(cache_dir: str, limit_gb: float, *, keep: str | None = None) -> list[str]:
    """Remove the least recently used shards until the cache holds at most ``limit_gb``; returns them."""
    if limit_gb <= 0:
        return []
    files = []
    for entry in os.scandir(cache_dir):
        if entry.is_file() and not entry.name.endswith(".lock") and ".tmp." not in entry.name:
            stat = entry.stat()
            files.append((stat.st_mtime, stat.st_size, entry.path))
    total, limit, removed = sum(f[1] for f in files), limit_gb * 1e9, []
    for _, size, path in sorted(files):
        if total <= limit:
            break
        if path == keep:
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:  # another process evicted it first
            pass
        total -= size
        removed.append(path)
    if removed:
        log.info("data cache %s: evicted %d least recently used shards (limit %.3g GB)", cache_dir,
                 len(removed), limit_gb)
    return removed
