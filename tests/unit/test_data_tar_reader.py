"""The shard reader: its fast ustar path yields exactly what tarfile-based reading yields."""
from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.data.tar_reader import count_samples, read_range

LONG = "x" * 120  # a key longer than ustar's 100-byte name field: needs a pax header


def samples(count: int, long_at: int | None = None) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    for i in range(count):
        key = f"{LONG}{i:03d}" if i == long_at else f"sample{i:03d}"
        out.append((key, {"jpg": bytes([i % 251]) * (700 + 37 * i), "cls": str(i % 10).encode()}))
    return out


def write_tar(path: Path, items, fmt=tarfile.PAX_FORMAT, compress: bool = False) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for key, files in items:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return str(path)


def as_tuples(items) -> list[tuple]:
    """(key, image, label, bad); a lost position's key is '<url>#<position>': keep the position."""
    return [(item["__key__"].rsplit("#", 1)[-1], item.get("jpg"), item.get("cls"), "__bad__" in item)
            for item in items]


def webdataset_reference(url: str) -> list[tuple]:
    """webdataset's own tar reader and grouping, for comparison."""
    stream = wds.tariterators.url_opener([{"url": url}])
    grouped = wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(stream))
    return [(s["__key__"], s["jpg"], s["cls"], False) for s in grouped]


@pytest.mark.parametrize("kind", ["ustar", "pax-mid-shard", "gnu", "gzip", "pipe"])
def test_reader_matches_webdataset(tmp_path, kind):
    items = samples(12, long_at=5 if kind == "pax-mid-shard" else None)
    fmt = tarfile.GNU_FORMAT if kind == "gnu" else tarfile.PAX_FORMAT
    path = write_tar(tmp_path / ("s.tar.gz" if kind == "gzip" else "s.tar"), items, fmt, compress=kind == "gzip")
    url = f"pipe:cat {path}" if kind == "pipe" else path
    expected = webdataset_reference(url)
    assert len(expected) == 12 and count_samples(url) == 12
    assert as_tuples(read_range(url, 0, 12)) == expected
    # a range in the middle, with placeholders whose data is not read
    middle = list(read_range(url, 3, 9, skip={4, 6}, first_id=100))
    assert [i["__key__"] for i in middle] == [e[0] for e in expected[3:9]]
    assert [("__skip__" in i) for i in middle] == [False, True, False, True, False, False]
    assert [i["__sid__"] for i in middle if "__skip__" not in i] == [103, 105, 107, 108]


def corrupt_header(path: Path, member: str) -> None:
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    data[offset + 10] ^= 0xFF  # inside the name: the header checksum no longer matches
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["checksum", "truncated-header", "truncated-data"])
def test_damaged_shards_read_like_tarfile(tmp_path, damage):
    """The fast path and tarfile (forced through a pipe) agree on what survives a damaged tar."""
    path = tmp_path / "s.tar"
    write_tar(path, samples(10))
    if damage == "checksum":
        corrupt_header(path, "sample006.jpg")
    else:
        with tarfile.open(path) as tar:
            member = tar.getmember("sample006.jpg")
        cut = member.offset + 200 if damage == "truncated-header" else member.offset_data + 100
        path.write_bytes(path.read_bytes()[:cut])
    fast = as_tuples(read_range(str(path), 0, 10))
    assert fast == as_tuples(read_range(f"pipe:cat {path}", 0, 10))
    assert [t[0] for t in fast[:6]] == [f"sample{i:03d}" for i in range(6)] and not any(t[3] for t in fast[:6])
    assert all(t[3] for t in fast[6:]) and len(fast) == 10  # one bad marker per lost position
