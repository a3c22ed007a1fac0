"""Webdataset shards in, an exact and auditable sample stream out.

``build_train_loader`` / ``build_eval_loader`` make a rank's loaders from ``cfg.data``;
``LedgerWriter`` records the keys of every step; ``write_shards`` (shards.py) makes shards.
"""
from importlib import import_module

# Loaded on first use, so that a module that needs none of them (shards.py for make_shards,
# sources.py for a config check) does not bring in torchvision and the decoders.
_WHERE = {"DataError": "errors", "EvalLoader": "eval_loader", "build_eval_loader": "eval_loader",
          "LedgerWriter": "ledger", "read_ledger": "ledger", "TrainLoader": "loader", "build_train_loader": "loader"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
