"""Typed configuration: YAML file, then dotted command-line overrides.

One dataclass per section (``model.py`` holds the ViT's shape and named sizes, ``sections.py``
the others and the root :class:`Config`); ``loading.py`` reads YAML and overrides and checks
every value's type. A mistake is a one-line :class:`ConfigError` naming the key and what is
allowed. Standard library and PyYAML only: everything else imports this package, never the reverse.
"""
from .errors import ConfigError
from .loading import (SECTIONS, apply_overrides, config_from_dict, dump_config, load_config, output_dir_of,
                      parse_override)
from .model import DEFAULT_SIZE, HIDDEN_ACTS, MODEL_SIZES, ModelConfig
from .sections import (AUGMENTS, OBJECTIVES, PRECISIONS, PROBE_FEATURES, CheckpointConfig, Config, DataConfig,
                       OptimConfig, ProbeConfig, TrainConfig)

__all__ = ["AUGMENTS", "DEFAULT_SIZE", "HIDDEN_ACTS", "MODEL_SIZES", "OBJECTIVES", "PRECISIONS", "PROBE_FEATURES",
           "SECTIONS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig",
           "ProbeConfig", "TrainConfig", "apply_overrides",
           "config_from_dict", "dump_config", "load_config", "output_dir_of", "parse_override"]
