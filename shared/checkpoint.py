"""Checkpoints that are never half-written, and the random state that makes a resume bit-identical.

A checkpoint is one ``torch.save`` dict (see :func:`save_checkpoint`'s caller in ``train.py`` for the
keys). Writing goes to ``NAME.tmp`` in the same directory, is flushed and ``fsync``-ed, and is then
renamed over ``NAME``: a rename within one filesystem is atomic, so a process killed at any moment
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

import io
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state"]


# Test hook (tests/test_reliability.py): with this environment variable set to S > 0, every checkpoint
# write stops for S seconds with half of the file written, so a test can kill a process mid-write.
TEST_WRITE_DELAY_ENV = "GHOST_NOISE_TEST_CHECKPOINT_WRITE_DELAY_S"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and the cause."""


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(state: dict, path: os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename).

    Raises:
        CheckpointError: the directory is not writable, the disk is full... The file at ``path``
            (the previous checkpoint, if any) is left as it was, and the temporary file is removed.
    """
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            delay = float(os.environ.get(TEST_WRITE_DELAY_ENV) or 0)
            if delay > 0:  # test hook: a slow disk, so a test can SIGKILL a half-written checkpoint
                buffer = io.BytesIO()
                torch.save(state, buffer)
                data = buffer.getvalue()
                handle.write(data[:len(data) // 2])
                handle.flush()
                time.sleep(delay)
                handle.write(data[len(data) // 2:])
            else:
                torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a short write as RuntimeError
        try:
            temporary.unlink()
        except OSError:
            pass
        raise CheckpointError(f"could not write checkpoint {path}: {error}; the previous checkpoint "
                              f"(if any) is intact") from error
    _fsync_directory(path.parent)


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
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint (no 'model' entry)")
    return state


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
