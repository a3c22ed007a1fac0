"""Checkpoints: saved by every rank and never half-written (``saving``), found and checked before a
resume (``store``, ``resume``), read fast (``read``), and exported in HuggingFace's format
(``export``, ``export_meta``); with ``checkpoint.async``, staged in host memory (``staging``)
and written in the background (``background``). ``from pipeline import checkpoint`` gives the trainer's API."""
from pipeline.checkpoint.background import BackgroundWriter, plan_background
from pipeline.checkpoint.resume import (FREE_FIELDS, ResumePlan, convert_to_universal, load, plan_resume,
                                        resolve_resume, start_over)
from pipeline.checkpoint.saving import prune, save, wait_for_prune
from pipeline.checkpoint.store import (COMPLETE, UNIVERSAL_SUFFIX, CheckpointError, checkpoint_root,
                                       complete_checkpoints, find_checkpoint, fsync_tree, is_complete,
                                       latest_complete, point_latest, read_marker, remove_checkpoint, step_of,
                                       universal_dir, write_marker)

__all__ = ["BackgroundWriter", "COMPLETE", "FREE_FIELDS", "UNIVERSAL_SUFFIX", "CheckpointError", "ResumePlan", "checkpoint_root",
           "complete_checkpoints", "convert_to_universal", "find_checkpoint", "fsync_tree", "is_complete",
           "latest_complete", "load", "plan_background", "plan_resume", "point_latest", "prune", "read_marker", "remove_checkpoint",
           "resolve_resume", "save", "start_over", "step_of", "universal_dir", "wait_for_prune", "write_marker"]
