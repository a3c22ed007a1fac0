"""Webdataset shards in, an exact and auditable sample stream out.

``build_train_loader`` / ``build_eval_loader`` make a rank's loaders from ``cfg.data``;
``LedgerWriter`` records the keys of every step; ``write_shards`` (shards.py) makes shards.
"""
from .ledger import LedgerWriter, read_ledger
from .eval_loader import EvalLoader, build_eval_loader
from .loader import TrainLoader, build_train_loader
from .errors import DataError

__all__ = ["DataError", "EvalLoader", "LedgerWriter", "TrainLoader", "build_eval_loader", "build_train_loader",
           "read_ledger"]
