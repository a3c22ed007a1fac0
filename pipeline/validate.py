"""Mistakes the typed config cannot see alone, refused by ``--check`` and before training starts.

Each check needs something beyond one section: the shards' manifest (how many classes there
are), the image loader (which channel counts it produces) or DeepSpeed's own config models
(which native keys exist). Each refusal is one line, a :class:`ConfigError` (exit 2), instead
of an IndexError in the loss, a ValueError in the loader or a pydantic traceback in
``deepspeed.initialize`` minutes later.
"""
from __future__ import annotations

import copy
import difflib
import logging
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.data.sources import IMAGE_CHANNELS, manifest_classes, manifest_of, manifest_says_unlabeled
from pipeline.distributed.engine import build_deepspeed_config

# Read by DeepSpeed outside the config parsing that validate_deepspeed watches.
DEEPSPEED_KEYS_READ_ELSEWHERE = {"sequence_parallel_size"}


def validate_run(cfg: Config, world_size: int) -> None:
    """Refuse (ConfigError) a config that would fail after the engine is built; returns None."""
    if cfg.model.num_channels not in IMAGE_CHANNELS:
        raise ConfigError(f"model.num_channels={cfg.model.num_channels} is not an image the loader makes; "
                          "use 1 (grayscale) or 3 (RGB)")
    if getattr(cfg.train, "objective", "classification") == "classification":
        check_num_labels(cfg)
    validate_deepspeed(cfg, world_size)


def check_num_labels(cfg: Config) -> None:
    manifest = manifest_of(cfg.data.train_shards, cfg.data.manifest)  # read once for both checks
    if manifest_says_unlabeled(manifest):
        raise ConfigError("train.objective=classification needs labels, but the manifest of data.train_shards says "
                          "its shards carry none (\"labeled\": false); use train.objective=mae or simmim, or "
                          "shards written with labels (make_shards without --unlabeled)")
    found = manifest_classes(manifest)
    if found is None:
        return
    classes, location = found
    if cfg.model.num_labels < len(classes):
        raise ConfigError(f"model.num_labels={cfg.model.num_labels} is smaller than the {len(classes)} classes of "
                          f"{location}; set model.num_labels={len(classes)}")


class _Recording(dict):
    """The native config, noting every top-level key DeepSpeed's parser asks for."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def keys(self):  # DeepSpeed also asks "KEY in param_dict.keys()"
        return _RecordingKeys(self)

    def __copy__(self):  # DeepSpeedConfig parses a copy; keep recording on it
        return self


class _RecordingKeys:
    def __init__(self, owner: _Recording):
        self.owner = owner

    def __contains__(self, key) -> bool:
        return key in self.owner

    def __iter__(self):
        return iter(dict.keys(self.owner))

    def __len__(self) -> int:
        return len(self.owner)


def validate_deepspeed(cfg: Config, world_size: int) -> dict[str, Any]:
    """Parse the merged native config with DeepSpeed's own ``DeepSpeedConfig``; return it merged.

    Its pydantic sub-models (``DeepSpeedZeroConfig``, ``DeepSpeedBF16Config``, ...) forbid unknown
    keys, so a typo inside a section is caught; an unknown top-level key, which DeepSpeed itself
    ignores, is refused with the keys it knows.
    """
    merged = build_deepspeed_config(cfg, world_size)
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as ds_logger
    from pydantic import ValidationError

    # Without a process group DeepSpeed assumes one rank; the batch sizes are ours and agree.
    native = copy.deepcopy(merged)
    native["train_batch_size"] = native["train_micro_batch_size_per_gpu"] * native["gradient_accumulation_steps"]
    recording = _Recording(native)
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)  # its parser logs the world size at INFO
    try:
        DeepSpeedConfig(recording)
    except ValidationError as error:
        raise ConfigError(_one_line(error, merged)) from None
    except (AssertionError, ValueError, KeyError, TypeError) as error:
        text = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError(f"DeepSpeed refuses the deepspeed section: {text}") from None
    finally:
        ds_logger.setLevel(level)
    known = recording.asked | DEEPSPEED_KEYS_READ_ELSEWHERE
    unknown = sorted(set(cfg.deepspeed) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        guess = f"did you mean deepspeed.{close[0]}? " if close else ""
        raise ConfigError(f"deepspeed.{unknown[0]} is not a DeepSpeed config key; {guess}known keys: "
                          f"{', '.join(sorted(known))}")
    return merged


def _one_line(error, merged: dict) -> str:
    """A pydantic ValidationError of a DeepSpeed section -> 'deepspeed.<path>: <problem>'."""
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ())]
    path = _find(merged, loc) or loc
    what = first.get("msg", "invalid")
    given = f" (got {first['input']!r})" if first.get("type") != "extra_forbidden" and "input" in first else ""
    hint = "check the spelling against DeepSpeed's config docs" if first.get("type") == "extra_forbidden" \
        else "fix the value"
    more = f" and {error.error_count() - 1} more" if error.error_count() > 1 else ""
    return f"deepspeed.{'.'.join(path)}: {what}{given} ({error.title}){more}; {hint}"


def _find(tree: dict, loc: list[str], prefix: tuple[str, ...] = ()) -> list[str] | None:
    """The full path of ``loc`` (relative to one sub-model) inside the merged native config."""
    node: Any = tree
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    else:
        if loc:
            return [*prefix, *loc]
    for key, value in tree.items():
        if isinstance(value, dict):
            found = _find(value, loc, (*prefix, key))
            if found:
                return found
    return None
