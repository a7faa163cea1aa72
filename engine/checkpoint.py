"""The old path ``clipdistill.engine.checkpoint``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.training.checkpoint`` instead.
The module was: Checkpoints without pickle: one safetensors file per checkpoint, JSON in its header.
"""
from clipdistill.engine.training.checkpoint import (FORMAT, CheckpointError, checkpoint_path, flatten_state,
                                                    latest_checkpoint, list_checkpoints, load_checkpoint, rng_state,
                                                    save_checkpoint, save_state, set_rng_state, unflatten_state)

__all__ = ["CheckpointError", "FORMAT", "checkpoint_path", "flatten_state", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "rng_state", "save_checkpoint", "save_state", "set_rng_state",
           "unflatten_state"]
