"""Shard sources: expand patterns into URLs and find every shard's sample count.

The exact stream (see ``partition.py``) needs the number of samples in every shard before the
first sample is read. ``make_shards`` writes them into ``manifest.json`` beside the shards.
Where that file is looked for:

- local paths (and ``file:`` URLs): ``<directory of the shard>/manifest.json``; without one,
  the samples are counted once by reading tar headers (no image data), with a warning;
- URLs with a scheme (``http://``, ``s3://``, ...): the URL with its last component replaced by
  ``manifest.json``, opened with webdataset's ``gopen``;
- ``pipe:`` commands: the command with the shard's ``.tar`` argument replaced by its sibling
  ``manifest.json`` (works for ``curl``, ``aws s3 cp``, ``gsutil cat``, ``cat``);
- anything else, or a manifest elsewhere: set ``data.manifest`` to its path or URL.

A local shard that does not exist, or a shard the manifest does not list, is a DataError that
names it, raised when the loader is built (before training starts).
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

from .errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_TAR_TOKEN = re.compile(r"[^\s'\"]+\.(?:tar|tar\.gz|tgz)(?=$|[\s'\"])")


@dataclass(frozen=True)
class Shard:
    url: str  # what webdataset's gopen opens
    num_samples: int


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


def read_manifest(location: str) -> dict:
    """Load a manifest (local path or any URL gopen opens); raise DataError when unusable."""
    try:
        with gopen(location) as stream:
            manifest = json.loads(stream.read())
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
    except DataError:
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


def count_local_shard(path: str) -> int:
    """Count a shard's samples from its tar headers only (used when there is no manifest)."""
    from .tar_reader import count_samples

    return count_samples(path)


def resolve_shards(spec: str | list[str], manifest: str | None = None, *, what: str = "data.train_shards"
                   ) -> list[Shard]:
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
    if manifest is not None:
        cache[manifest] = manifest_counts(read_manifest(manifest))
    shards = []
    for url in urls:
        location = manifest or manifest_beside(url)
        if location not in cache:
            cache[location] = _counts_beside(location)
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
        shards.append(Shard(url, counts[name]))
    return shards


def _counts_beside(location: str) -> dict[str, int] | None:
    """Counts from a manifest found beside the shards; None where there is none."""
    path = local_path(location)
    if path is not None:
        return manifest_counts(read_manifest(location)) if os.path.isfile(path) else None
    try:
        return manifest_counts(read_manifest(location))
    except DataError:
        return None
