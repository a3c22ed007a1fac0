"""Read a range of samples from a tar shard, skipping the others by their headers alone.

webdataset's ``tar_file_iterator`` reads every member's bytes; the exact stream needs to start
in the middle of a shard and, on resume, to pass over samples that were already consumed
without reading (let alone decoding) them. This reader walks the tar headers with the standard
library (seeking past data on local files), groups members into samples with webdataset's own
``base_plus_ext`` rule, and yields exactly one item per requested position:

- a raw sample ``{"__key__", "__url__", "__sid__", "<ext>": bytes, ...}``;
- a placeholder ``{"__key__", "__skip__": True}`` for positions in ``skip`` (data not read);
- a bad marker ``{"__key__", "__bad__": reason}`` where the tar is corrupt or ends early.

One item per position keeps the shuffle downstream a function of positions only, so bad data
never shifts the stream of the other samples and a resume replays it exactly.

Headers of plain POSIX ustar members (what webdataset's writer and GNU tar produce for short
names) are read with a few slices (``_UstarWalker``) instead of ``tarfile``'s full parse, about
5% of a worker's time (docs/DECISIONS.md, Data workers).
Anything else (pax or GNU long-name headers, base-256 sizes, compressed or piped tars) is left
to ``tarfile``, which takes over at that header.

A remote shard (a ``remote.RemoteShard``, for ``s3://`` and ``http(s)://``) is read through a
``remote.RangeFile``: where the manifest gives the samples' byte offsets, only the bytes of
samples [start, stop) are requested, starting at the first one's header; with ``data.cache_dir``
the whole shard is fetched once into the node's cache and read from there (``cache.py``).
``open_stream`` opens that file; a worker's prefetch thread calls it for the next piece ahead of
the reader and hands the open stream to ``read_range`` (``prefetch.py``).
"""
from __future__ import annotations

import re
import tarfile
import threading
from collections.abc import Callable, Container, Iterator
from typing import BinaryIO

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

from .errors import DataError, StoreUnavailable
from .remote import RangeFile, RemoteShard

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta


def _tarfile(stream) -> tarfile.TarFile:
    seekable = getattr(stream, "seekable", lambda: False)()
    # Seekable local files: tarfile seeks past the data of members that are not read; it starts
    # at the stream's current position, so it can take over from _UstarWalker at any header.
    return tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*")


def _regular_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        tar.members = []  # keep memory flat on long shards (as webdataset does)
        if member.isreg():
            yield member


class _Member:
    """The fields of a tar member the readers use (a subset of ``tarfile.TarInfo``)."""

    __slots__ = ("name", "size", "offset_data")

    def __init__(self, name: str, size: int, offset_data: int):
        self.name, self.size, self.offset_data = name, size, offset_data

    def issparse(self) -> bool:
        return False


class _UstarWalker:
    """Regular members of an uncompressed, seekable tar, read from POSIX ustar headers.

    ``members()`` yields ``_Member``s while the headers are plain ustar ones; at the first other
    header it yields ``tarfile``'s members from that header on (``self.tar``, opened there).
    """

    BLOCK = 512
    _REGULAR, _OTHER_PLAIN = (b"0", b"\0", b"7"), (b"1", b"2", b"3", b"4", b"5", b"6")

    def __init__(self, stream):
        self.stream, self.tar = stream, None

    @classmethod
    def applies_to(cls, stream) -> bool:
        if not getattr(stream, "seekable", lambda: False)():
            return False
        start = stream.tell()
        first = stream.read(cls.BLOCK)
        stream.seek(start)
        return len(first) == cls.BLOCK and first[257:265] == b"ustar\x0000"

    def _parse(self, block: bytes) -> tuple[str, int, bytes] | None:
        """(name, size, type) of a plain ustar header; None for anything tarfile must read."""
        if block[257:265] != b"ustar\x0000" or block[124] & 0x80:  # not POSIX ustar / base-256 size
            return None
        try:
            stored = int(block[148:156].split(b"\0", 1)[0].strip(), 8)
        except ValueError:
            return None
        if stored != sum(block) - sum(block[148:156]) + 8 * 32:  # checksum: its own field as spaces
            return None  # corrupt (or a signed checksum): tarfile decides, as it would without us
        kind = block[156:157]
        if kind not in self._REGULAR and kind not in self._OTHER_PLAIN:
            return None  # pax ('x', 'g'), GNU long names ('L', 'K'), sparse ('S'), ...
        name = block[:100].split(b"\0", 1)[0]
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        try:
            size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            return None
        return name.decode("utf-8", "surrogateescape"), size, kind

    def members(self) -> Iterator[_Member | tarfile.TarInfo]:
        stream, block_size = self.stream, self.BLOCK
        at = stream.tell()  # the next header (the reader moves the stream in between)
        while True:
            stream.seek(at)
            block = stream.read(block_size)
            if len(block) < block_size:
                return  # cut off (or no end-of-archive blocks): like tarfile, the archive ends here
            if block.count(0) == block_size:
                return  # end of archive
            parsed = self._parse(block)
            if parsed is None:  # tarfile reads this header and the rest
                stream.seek(at)
                self.tar = _tarfile(stream)
                yield from _regular_members(self.tar)
                return
            name, size, kind = parsed
            if kind in self._REGULAR and not name.endswith("/"):  # (old tars mark directories so)
                yield _Member(name, size, at + block_size)
            at += block_size + -(-size // block_size) * block_size


def open_stream(source: str | RemoteShard, start: int = 0, stop: int | None = None, *,
                cancel: threading.Event | None = None) -> tuple[BinaryIO, int]:
    """(the file samples [start, stop) of ``source`` are read from, the position of the sample it
    starts at). ``cancel``: the event that calls off a prefetch's remote reads (``prefetch.py``)."""
    if isinstance(source, str):
        return gopen(source), 0
    if source.io.cache_dir:
        from .cache import cached_shard

        return open(cached_shard(source, stop=cancel), "rb"), 0
    if source.offsets is None:
        return RangeFile(source.url, source.io, stop=cancel), 0
    # only the bytes of samples [start, stop)
    begin, end = source.window(start, len(source.offsets) if stop is None else stop)
    return RangeFile(source.url, source.io, begin=begin, end=end, stop=cancel), start


class _TarReader:
    """The regular members of one shard, and their data. ``opened``: a callable giving what
    ``open_stream`` gives, already opened (a prefetch's ``take``)."""

    def __init__(self, source: str | RemoteShard, start: int = 0, stop: int | None = None, opened=None):
        self.tar = None
        # first: the position of the first sample the stream starts at
        self.stream, self.first = opened() if opened is not None else open_stream(source, start, stop)
        if _UstarWalker.applies_to(self.stream):
            self._walker = _UstarWalker(self.stream)
            self.members = self._walker.members()
        else:
            self._walker, self.tar = None, _tarfile(self.stream)
            self.members = _regular_members(self.tar)

    def data(self, member: _Member | tarfile.TarInfo) -> bytes | bytearray:
        """The member's bytes: a seek + read where the tar is a plain file, else through tarfile."""
        tar = self.tar if self._walker is None else self._walker.tar
        if tar is not None and (tar.fileobj is not self.stream or member.issparse()):  # pipe or compressed
            return tar.extractfile(member).read()
        # (tarfile.extractfile() wraps every member in two file objects; the walkers seek to the
        # next header themselves.)
        self.stream.seek(member.offset_data)
        data = bytearray(member.size)  # writable: the decoder wraps it without another copy
        if self.stream.readinto(data) != member.size:
            raise tarfile.ReadError("unexpected end of data")
        return data

    def close(self) -> None:
        for tar in (self.tar, self._walker and self._walker.tar):
            if tar is not None:
                tar.close()
        self.stream.close()


def _sample_members(members: Iterator[_Member | tarfile.TarInfo]) -> Iterator[tuple[str, str, _Member]]:
    """(sample key, extension, member) for every file that belongs to a sample, in tar order."""
    for member in members:
        name = member.name
        if _SKIP_META.match(name):
            continue
        if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
            continue
        prefix, suffix = base_plus_ext(name)
        if prefix is not None:
            yield prefix, suffix.lower(), member


def _url(source: str | RemoteShard) -> str:
    return source if isinstance(source, str) else source.url


def sample_offsets(path: str) -> tuple[list[int], int]:
    """The byte offset of every sample's first header, and the file's size (for the manifest)."""
    reader = _TarReader(path)
    try:
        offsets, key = [], None
        for prefix, _, member in _sample_members(reader.members):
            if prefix != key:
                key = prefix
                offsets.append(member.offset_data - _UstarWalker.BLOCK if isinstance(member, _Member)
                               else member.offset)
        reader.stream.seek(0, 2)
        return offsets, reader.stream.tell()
    finally:
        reader.close()


def count_samples(url: str) -> int:
    """Number of samples in a shard, from its headers only."""
    reader = _TarReader(url)
    try:
        count, key = 0, None
        for prefix, _, _ in _sample_members(reader.members):
            if prefix != key:
                count, key = count + 1, prefix
        return count
    finally:
        reader.close()


def read_range(source: str | RemoteShard, start: int, stop: int, *, skip: Container[int] = (), first_id: int = 0,
               opened: Callable[[], tuple[BinaryIO, int]] | None = None) -> Iterator[dict]:
    """One item per sample position in [start, stop) of the shard ``source`` (see module doc).

    ``skip`` holds positions to return as placeholders; ``first_id + position`` becomes the
    sample's stable id ``__sid__`` (used to seed its augmentation). A remote store that stays
    unreachable raises ``StoreUnavailable``: that is no bad data, and the run stops to be requeued.
    ``opened``: the stream, opened ahead by a prefetch (``prefetch.Prefetch.take``); its errors
    are raised here, as the reader's own would be.
    """
    url = _url(source)
    position, emitted, key, current = -1, 0, None, None
    reason = "tar ended early (truncated or corrupt)"
    reader = None
    try:
        reader = _TarReader(source, start, stop, opened)
        position = reader.first - 1
        for prefix, suffix, member in _sample_members(reader.members):
            if prefix != key:
                if current is not None:
                    emitted += 1
                    yield current
                position, key, current = position + 1, prefix, None
                if position >= stop:
                    break
                if position >= start:
                    current = ({"__key__": key, "__skip__": True} if position in skip
                               else {"__key__": key, "__url__": url, "__sid__": first_id + position})
            if current is not None and "__skip__" not in current:
                current[suffix] = reader.data(member)
        else:
            if current is not None:
                last, current = current, None
                emitted += 1
                yield last
    except (StoreUnavailable, DataError):  # the store, not the data: stop the run, in one line
        raise
    except Exception as error:  # a bad shard must not stop the run: the rest becomes bad markers
        reason = f"unreadable tar ({type(error).__name__}: {error})"
        if current is not None and emitted < stop - start:
            emitted += 1
            yield {"__key__": current["__key__"], "__url__": url, "__bad__": reason}
    finally:
        if reader is not None:
            reader.close()
    for missing in range(start + emitted, stop):
        yield {"__key__": f"{url}#{missing}", "__url__": url, "__bad__": reason}
