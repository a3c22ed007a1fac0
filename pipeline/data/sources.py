"""Shard sources: expand patterns into URLs and find every shard's sample count.

The exact stream (see ``partition.py``) needs the number of samples in every shard before the
first sample is read. ``make_shards`` writes them into ``manifest.json`` beside the shards.
Where that file is looked for:

- local paths (and ``file:`` URLs): ``<directory of the shard>/manifest.json``; without one,
  the samples are counted once by reading tar headers (no image data), with a warning;
- URLs with a scheme (``s3://``, ``http(s)://``, ...): the URL with its last component replaced by
  ``manifest.json``; ``s3://`` and ``http(s)://`` are read with ``remote.py`` (boto3, requests),
  other schemes with webdataset's ``gopen``;
- ``pipe:`` commands: the command with the shard's ``.tar`` argument replaced by its sibling
  ``manifest.json`` (works for ``curl``, ``aws s3 cp``, ``gsutil cat``, ``cat``);
- anything else, or a manifest elsewhere: set ``data.manifest`` to its path or URL.

A local shard that does not exist, or a shard the manifest does not list, is a DataError that
names it, raised when the loader is built (before training starts). So is a remote shard that a
HEAD request does not find, a missing bucket, or a refused credential. A remote shard carries
its samples' byte offsets and its size from the manifest, where make_shards wrote them.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from urllib.parse import urlparse

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from .errors import DataError, StoreUnavailable
from .remote import IoOptions, RemoteShard, is_remote, object_size, read_object

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif")  # what a sample's image may be stored as
IMAGE_CHANNELS = (1, 3)  # what the decoder (transforms.decode) makes: grayscale or RGB
_TAR_TOKEN = re.compile(r"[^\s'\"]+\.(?:tar|tar\.gz|tgz)(?=$|[\s'\"])")


@dataclass(frozen=True)
class Shard:
    url: str  # what webdataset's gopen opens, or an s3:// / http(s):// URL read by remote.py
    num_samples: int
    remote: RemoteShard | None = None  # s3:// and http(s)://: how tar_reader reads it

    @property
    def source(self) -> str | RemoteShard:
        """What ``tar_reader.read_range`` takes."""
        return self.remote if self.remote is not None else self.url


def expand_sources(spec: str | list[str]) -> list[str]:
    """Brace patterns, '::'-joined lists and lists of either -> a flat list of shard URLs."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        urls.extend(u for u in expand_urls(item) if u)
    return urls


def local_path(url: str) -> str | None:
    """The file path of a local shard, or None for a remote URL / pipe command."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return url
    return None


def shard_name(url: str) -> str:
    """The file name the manifest lists for this shard (``train-000003.tar``)."""
    path = local_path(url)
    if path is not None:
        return os.path.basename(path)
    if url.startswith("pipe:"):
        tokens = _TAR_TOKEN.findall(url[5:])
        if not tokens:
            raise DataError(f"cannot tell the shard file name in '{url}': the command should name a "
                            "'.tar' file, or list the shards by path")
        return os.path.basename(urlparse(tokens[-1]).path or tokens[-1])
    return os.path.basename(urlparse(url).path)


def manifest_beside(url: str) -> str:
    """Where the manifest of the shard at ``url`` is looked for (see the module docstring)."""
    path = local_path(url)
    if path is not None:
        return os.path.join(os.path.dirname(path), MANIFEST)
    if url.startswith("pipe:"):
        tokens = _TAR_TOKEN.findall(url)
        if not tokens:
            raise DataError(f"cannot derive a manifest location from '{url}'; set data.manifest")
        token = tokens[-1]
        sibling = token[: len(token) - len(os.path.basename(token))] + MANIFEST
        start = url.rfind(token)
        return url[:start] + sibling + url[start + len(token):]
    parsed = urlparse(url)
    parent = parsed.path.rsplit("/", 1)[0]
    return parsed._replace(path=f"{parent}/{MANIFEST}").geturl()


def read_manifest(location: str, io: IoOptions = IoOptions()) -> dict:
    """Load a manifest (local path, s3:// or http(s):// URL, or anything gopen opens); raise
    DataError when unusable."""
    try:
        if is_remote(location):
            manifest = json.loads(read_object(location, io))
        else:
            with gopen(location) as stream:
                manifest = json.loads(stream.read())
    except DataError as error:  # named by remote.py (missing bucket or key, refused credentials)
        raise DataError(f"cannot read the manifest: {error}") from None
    except Exception as error:  # missing file, failing command, bad JSON: all the same to the user
        raise DataError(f"cannot read the manifest '{location}': {error}") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s and "num_samples" in s
                                               for s in shards):
        raise DataError(f"manifest '{location}' has no 'shards' list of {{name, num_samples}}; "
                        "rewrite it with launch/make_shards.py")
    return manifest


def manifest_of(spec: str | list[str], manifest: str | None = None) -> tuple[dict, str] | None:
    """The manifest of the shards ``spec`` names and where it is; None when there is no readable one
    (the loader then counts samples itself)."""
    urls = expand_sources(spec)
    if not urls:
        return None
    location = manifest or manifest_beside(urls[0])
    try:
        return read_manifest(location), location
    except (DataError, StoreUnavailable):  # resolve_shards names the problem, in the trainer's own error path
        return None


def manifest_classes(found: tuple[dict, str] | None) -> tuple[list[str], str] | None:
    """The class names of a manifest (``manifest_of``) and where it is; None when it names none."""
    classes = found[0].get("classes") if found else None
    return ([str(c) for c in classes], found[1]) if isinstance(classes, list) and classes else None


def manifest_says_unlabeled(found: tuple[dict, str] | None) -> bool:
    """True when a manifest (``manifest_of``) records ``"labeled": false`` (make_shards --unlabeled)."""
    return found is not None and found[0].get("labeled", True) is False


def manifest_counts(manifest: dict) -> dict[str, int]:
    return {s["name"]: int(s["num_samples"]) for s in manifest["shards"]}


def _remote_shard(url: str, entry: dict | None, io: IoOptions) -> RemoteShard:
    """The shard as the reader takes it: its samples' byte offsets and size from the manifest
    (make_shards writes them; without them a shard is read from its start, and sized by HEAD)."""
    offsets = entry.get("offsets") if entry else None
    size = entry.get("bytes") if entry else None
    return RemoteShard(url, tuple(int(o) for o in offsets) if isinstance(offsets, list) else None,
                       None if size is None else int(size), io)


def _check_remote(shards: list[Shard], what: str) -> list[Shard]:
    """HEAD every remote shard (16 at a time): a missing one, or one of another size than the
    manifest's, is named before training. Returns the shards with their sizes."""
    from concurrent.futures import ThreadPoolExecutor

    def size_of(shard: Shard) -> int:
        return object_size(shard.url, shard.remote.io) if shard.remote is not None else -1

    checked = []
    with ThreadPoolExecutor(16) as pool:
        for shard, size in zip(shards, pool.map(size_of, shards)):
            remote = shard.remote
            if remote is not None and remote.size is not None and size != remote.size:
                raise DataError(f"shard '{shard.url}' is {size} bytes, its manifest says {remote.size}: "
                                f"the shards and the manifest differ; rewrite them together (check {what})")
            if remote is not None and remote.size is None:
                shard = Shard(shard.url, shard.num_samples, RemoteShard(remote.url, remote.offsets, size, remote.io))
            checked.append(shard)
    return checked


def count_local_shard(path: str) -> int:
    """Count a shard's samples from its tar headers only (used when there is no manifest)."""
    from .tar_reader import count_samples

    return count_samples(path)


def resolve_shards(spec: str | list[str], manifest: str | None = None, *, what: str = "data.train_shards",
                   io: IoOptions = IoOptions()) -> list[Shard]:
    """Expand ``spec`` and attach each shard's sample count; every problem is a DataError."""
    urls = expand_sources(spec)
    if not urls:
        raise DataError(f"{what} names no shards; give a path or brace pattern of .tar shards")
    missing = [u for u in urls if local_path(u) is not None and not os.path.isfile(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"shard '{missing[0]}' does not exist{more}; check {what}")
    # An explicit data.manifest must be readable; one found beside the shards may be absent.
    cache: dict[str, dict[str, int] | None] = {}
    entries: dict[str, dict[str, dict]] = {}  # the manifest's entry of every shard, by location and name
    if manifest is not None:
        found = read_manifest(manifest, io)
        cache[manifest], entries[manifest] = manifest_counts(found), {e["name"]: e for e in found["shards"]}
    shards = []
    for url in urls:
        location = manifest or manifest_beside(url)
        if location not in cache:
            found = _manifest_beside(location, io)
            cache[location] = manifest_counts(found) if found is not None else None
            entries[location] = {e["name"]: e for e in found["shards"]} if found is not None else {}
        counts = cache[location]
        name = shard_name(url)
        if counts is None:
            path = local_path(url)
            if path is None:
                raise DataError(f"no manifest for '{url}' at '{location}': the exact stream needs per-shard "
                                "sample counts; put manifest.json beside the shards or set data.manifest")
            log.warning("no %s beside %s: counting its samples from tar headers", MANIFEST, path)
            shards.append(Shard(url, count_local_shard(path)))
            continue
        if name not in counts:
            raise DataError(f"shard '{url}' is not listed in the manifest '{location}'; "
                            "rewrite the manifest or fix the shard pattern")
        remote = _remote_shard(url, entries[location].get(name), io) if is_remote(url) else None
        shards.append(Shard(url, counts[name], remote))
    if any(s.remote is not None for s in shards):
        shards = _check_remote(shards, what)
    return shards


def _manifest_beside(location: str, io: IoOptions) -> dict | None:
    """A manifest found beside the shards; None where there is none. A remote one must be there:
    its absence (or a missing bucket, a refused credential) is named at once."""
    path = local_path(location)
    if path is not None:
        return read_manifest(location) if os.path.isfile(path) else None
    if is_remote(location):
        return read_manifest(location, io)
    try:
        return read_manifest(location)
    except DataError:
        return None
