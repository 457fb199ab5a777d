"""Checkpoints that are never half-written, and the random state that makes a resume bit-identical.

A checkpoint is one ``torch.save`` dict (see :func:`save_checkpoint`'s caller in ``train.py`` for the
keys) with timm's keys: ``state_dict`` (the model), ``state_dict_ema`` (the EMA model, or None),
``optimizer``, ``amp_scaler``, ``epoch``, ``arch``, ``args``, ``metric``, so
``timm.models.load_checkpoint(model, path, use_ema=...)`` and ``timm.models.resume_checkpoint`` read it.
``epoch`` is the next epoch to run (with ``batch``, the next micro-batch of it); no ``version`` key is
written, which is how timm's ``resume_checkpoint`` reads ``epoch`` as the epoch to resume at.
Checkpoints of the previous version (``model``/``ema``) are read through :func:`with_timm_keys`.

Writing goes to ``NAME.tmp`` in the same directory, is flushed and ``fsync``-ed, and is then renamed
over ``NAME``: a rename within one filesystem is atomic, so a process killed at any moment
leaves either the old checkpoint or the new one, never a mixture. Reading uses
``torch.load(weights_only=True)``, which unpickles tensors and plain Python containers only, so a
checkpoint from an untrusted source cannot run code.

Random state. :func:`capture_rng_state` gathers every stream a training step may draw from: torch's
CPU generator, every CUDA device's generator, numpy's and Python's global generators, and the noise
layers' dedicated ``torch.Generator`` (see :func:`shared.specs.attach_noise_generator`). Data order and
augmentation need no state of their own: they are functions of ``(seed, epoch, position)``
(:mod:`shared.data`). All of it is stored as tensors and plain containers, so ``weights_only`` loading
accepts it.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from shared.run_files import atomic_write, describe_os_error

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "with_timm_keys", "capture_rng_state",
           "restore_rng_state"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and the cause."""


def save_checkpoint(state: dict, path: os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (:func:`shared.run_files.atomic_write`).

    Raises:
        CheckpointError: the directory is not writable, the disk is full... The file at ``path``
            (the previous checkpoint, if any) is left as it was, and the temporary file is removed.
    """
    try:
        atomic_write(path, lambda handle: torch.save(state, handle))
    except (OSError, RuntimeError) as error:  # (a write error of the handle reaches us as the OSError itself)
        cause = describe_os_error(error) if isinstance(error, OSError) else str(error)
        raise CheckpointError(f"could not write checkpoint {path}: {cause}; the previous checkpoint "
                              f"(if any) is intact") from error


def load_checkpoint(path: os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or holds something other than a
            checkpoint dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError... for bad files
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt?): "
                              f"{type(error).__name__}: {error}") from None
    if not isinstance(state, dict) or not ("state_dict" in state or "model" in state):
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint (no 'state_dict' entry)")
    return with_timm_keys(state)


def with_timm_keys(state: dict) -> dict:
    """A checkpoint of the previous version (``model``, ``ema``, ``scaler``) with timm's keys
    (``state_dict``, ``state_dict_ema``, ``amp_scaler``); others unchanged.

    The previous version stored the EMA as ``ModelEmaV3.state_dict()``, whose keys carry the wrapper's
    ``module.`` prefix; timm (and this version) store the EMA model's own state dict, without it.
    """
    if "state_dict" in state or "model" not in state:
        return state
    upgraded = {key: value for key, value in state.items() if key not in ("model", "ema", "scaler")}
    ema = state.get("ema")
    ema_weights = None if ema is None else {key.removeprefix("module."): value for key, value in ema.items()}
    return {**upgraded, "state_dict": state["model"], "state_dict_ema": ema_weights, "amp_scaler": state.get("scaler")}


def capture_rng_state(noise_generator: Optional[torch.Generator] = None) -> dict:
    """Every random stream of this process, as tensors and plain containers."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "position": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": random.getstate(),
    }
    if noise_generator is not None:
        state["noise"] = noise_generator.get_state()
    return state


def restore_rng_state(state: dict, noise_generator: Optional[torch.Generator] = None) -> None:
    """Set every random stream back to what :func:`capture_rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["numpy"]
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["position"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if noise_generator is not None and "noise" in state:
        noise_generator.set_state(state["noise"])
