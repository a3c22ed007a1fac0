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
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Container, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta


def _open(url: str):
    stream = gopen(url)
    seekable = getattr(stream, "seekable", lambda: False)()
    # Seekable local files: tarfile seeks past the data of members that are not read.
    return stream, tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*")


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, stream) -> bytes:
    """The member's data; from a seekable uncompressed tar, a direct read at tarfile's offset."""
    if tar.fileobj is not stream or member.issparse():  # a pipe or a compressed tar
        return tar.extractfile(member).read()
    # extractfile() wraps every member in two file objects; a seek + read is the same bytes
    # (tarfile.next() seeks back to the next header itself).
    stream.seek(member.offset_data)
    data = stream.read(member.size)
    if len(data) != member.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _sample_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(sample key, extension, member) for every file that belongs to a sample, in tar order."""
    while (member := tar.next()) is not None:
        tar.members = []  # keep memory flat on long shards (as webdataset does)
        name = member.name
        if not member.isreg() or _SKIP_META.match(name):
            continue
        if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
            continue
        prefix, suffix = base_plus_ext(name)
        if prefix is not None:
            yield prefix, suffix.lower(), member


def count_samples(url: str) -> int:
    """Number of samples in a shard, from its headers only."""
    stream, tar = _open(url)
    try:
        count, key = 0, None
        for prefix, _, _ in _sample_members(tar):
            if prefix != key:
                count, key = count + 1, prefix
        return count
    finally:
        tar.close()
        stream.close()


def read_range(url: str, start: int, stop: int, *, skip: Container[int] = (), first_id: int = 0
               ) -> Iterator[dict]:
    """One item per sample position in [start, stop) of the shard at ``url`` (see module doc).

    ``skip`` holds positions to return as placeholders; ``first_id + position`` becomes the
    sample's stable id ``__sid__`` (used to seed its augmentation).
    """
    position, emitted, key, current = -1, 0, None, None
    reason = "tar ended early (truncated or corrupt)"
    stream = tar = None
    try:
        stream, tar = _open(url)
        for prefix, suffix, member in _sample_members(tar):
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
                current[suffix] = _member_bytes(tar, member, stream)
        else:
            if current is not None:
                last, current = current, None
                emitted += 1
                yield last
    except Exception as error:  # a bad shard must not stop the run: the rest becomes bad markers
        reason = f"unreadable tar ({type(error).__name__}: {error})"
        if current is not None and emitted < stop - start:
            emitted += 1
            yield {"__key__": current["__key__"], "__bad__": reason}
    finally:
        if tar is not None:
            tar.close()
        if stream is not None:
            stream.close()
    for missing in range(start + emitted, stop):
        yield {"__key__": f"{url}#{missing}", "__bad__": reason}
