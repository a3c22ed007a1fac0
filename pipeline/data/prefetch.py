"""Remote pieces opened ahead: a worker's next ranged GET is under way while it reads the current one.

A loader slot reads a list of *pieces* (a shard, or a byte range of one: ``read_range``'s
arguments). Opening a remote piece costs the store's first-byte latency (S3: tens of ms, a new
request each time); paid at every shard boundary, it stalls the worker that many times an
epoch. ``read_pieces`` reads the pieces in turn and, once the current piece has given its first
item, starts one thread that opens the next piece: its ranged GET, and its first ``HEAD_BYTES``
read into memory (``RangeFile.prime``); with ``data.cache_dir``, the whole shard fetched into
the node's cache (under the cache's lock) and opened. When the reader gets there, it takes the
open stream: no round trip.

- The same bytes as without: the prefetch opens exactly the reader's stream (``open_stream``),
  and ``HEAD_BYTES`` is at most what the reader itself reads through rather than seek
  (``SEEK_THROUGH``). A slot's last piece prefetches nothing, so nothing beyond the slice is asked for.
- One prefetch in flight per slot. Local files have none: the page cache does that job.
- The thread retries as the reader does (``data.io_retries``, ``data.io_timeout_s``); what it
  raises (``StoreUnavailable``, ``DataError``, anything else) is kept and raised when the piece
  is read (``take``), where the reader's own error would be.
- Closing the reader (a generator closed, a worker stopped) calls the prefetch off: its next
  request or backoff raises ``Cancelled``, and whatever it opened is closed. A request already
  waiting on the store ends within ``io_timeout_s``; the thread is a daemon, and it never retries
  once called off.
- The thread draws nothing from the global RNGs (the backoff's jitter has its own generator):
  the worker seeds them per sample for augmentation.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from .remote import SEEK_THROUGH, RangeFile, RemoteShard
from .tar_reader import open_stream, read_range

# The first bytes read ahead: the first-byte latency is the stall; bytes after it stream on the
# open body. 1 MiB is about ten ImageNet JPEGs, what a fresh connection's first round trips
# deliver, and never more than the reader would read through anyway (SEEK_THROUGH).
HEAD_BYTES = SEEK_THROUGH
THREAD_NAME = "shard-prefetch"
CANCEL_WAIT_S = 2.0  # how long closing waits for a request in flight before leaving it to end alone


@dataclass(frozen=True)
class Piece:
    """What one ``read_range`` call reads: samples [start, stop) of ``source``."""

    source: str | RemoteShard
    start: int
    stop: int
    skip: Container[int] = field(default=frozenset())
    first_id: int = 0


class Prefetch:
    """A remote piece's stream, opened (and its first bytes read) by a thread."""

    def __init__(self, piece: Piece):
        self.piece = piece
        self._cancel = threading.Event()
        self._opened: tuple[BinaryIO, int] | None = None
        self._error: Exception | None = None
        self._taken = False
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, piece: Piece) -> Prefetch | None:
        """A prefetch of ``piece``; None for a local file, or with ``data.io_prefetch`` off."""
        source = piece.source
        if isinstance(source, str) or not source.io.prefetch:
            return None
        return cls(piece)

    def _run(self) -> None:
        piece = self.piece
        try:
            stream, first = open_stream(piece.source, piece.start, piece.stop, cancel=self._cancel)
            try:
                if isinstance(stream, RangeFile):
                    stream.prime(HEAD_BYTES)
            except BaseException:
                stream.close()
                raise
            self._opened = (stream, first)
        except Exception as error:  # noqa: BLE001 - kept for take(): raised where the reader reads
            self._error = error
        if self._cancel.is_set():  # called off meanwhile: nobody will take it
            self._discard()

    def take(self) -> tuple[BinaryIO, int]:
        """The opened stream and its first sample's position (``open_stream``'s), or the error
        opening it raised; waits for the thread."""
        self._thread.join()
        self._taken = True
        if self._error is not None:
            raise self._error
        return self._opened

    def cancel(self) -> None:
        """Call the prefetch off and close what it opened (nothing, once taken)."""
        if self._taken:
            return
        self._cancel.set()
        self._thread.join(CANCEL_WAIT_S)
        if not self._thread.is_alive():
            self._discard()

    def _discard(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            opened[0].close()


def read_pieces(pieces: list[Piece]) -> Iterator[tuple[int, int, dict]]:
    """(piece index, sample position, item) for every item of every piece in turn (``read_range``'s
    items). From a piece's first item on, the next piece is opened ahead (``Prefetch``)."""
    opened = ahead = None
    try:
        for index, piece in enumerate(pieces):
            opened, ahead = ahead, None
            following = pieces[index + 1] if index + 1 < len(pieces) else None
            items = read_range(piece.source, piece.start, piece.stop, skip=piece.skip, first_id=piece.first_id,
                               opened=opened.take if opened is not None else None)
            with contextlib.closing(items):
                for position, item in enumerate(items, piece.start):
                    if following is not None:  # this piece's stream is open: open the next one now
                        ahead, following = Prefetch.start(following), None
                    yield index, position, item
            if following is not None:  # a piece without items (none in practice)
                ahead = Prefetch.start(following)
    finally:
        for prefetch in (opened, ahead):
            if prefetch is not None:
                prefetch.cancel()
