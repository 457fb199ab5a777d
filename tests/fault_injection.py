"""Test-only entry point: train.py with faults injected by patching, then ``train.main``.

    python tests/fault_injection.py --slow-checkpoint-write 1.5 [train.py arguments...]
    python tests/fault_injection.py --sigint eval 1 [train.py arguments...]

``--slow-checkpoint-write S``: every checkpoint write stops for S seconds with half of the file written
(a slow disk), so a test can kill the process while ``last.pth.tar.tmp`` is half-written.
``--sigint WHEN COUNT``: the process sends itself COUNT real SIGINTs (a Ctrl-C, pressed COUNT times)
at a moment no outside timing can hit reliably: ``eval`` (as the first evaluation starts) or K (inside
the K-th training forward pass, counted from 1 across epochs). Production code reads no test switch;
the patches replace what ``train.main`` calls.
"""
from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any directory

import train  # noqa: E402
from shared import checkpoint  # noqa: E402


def slow_checkpoint_writes(delay_s: float) -> None:
    """Patch :mod:`shared.checkpoint` so each write pauses ``delay_s`` seconds half-way through the file."""
    atomic_write = checkpoint.atomic_write

    def write_slowly(path, write) -> None:
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()

        def halves(handle) -> None:
            handle.write(data[:len(data) // 2])
            handle.flush()
            time.sleep(delay_s)
            handle.write(data[len(data) // 2:])

        atomic_write(path, halves)

    checkpoint.atomic_write = write_slowly


def _interrupt(count: int) -> None:
    for _ in range(count):
        os.kill(os.getpid(), signal.SIGINT)  # each handled at once, in this (the main) thread


def sigint_during_evaluation(count: int) -> None:
    """Patch ``train.evaluate`` to send ``count`` SIGINTs as the first evaluation starts."""
    evaluate, sent = train.evaluate, []

    def interrupted(*args, **kwargs):
        if not sent:
            sent.append(True)
            _interrupt(count)
        return evaluate(*args, **kwargs)

    train.evaluate = interrupted


def sigint_during_step(step: int, count: int) -> None:
    """Patch ``train.build_model`` so the ``step``-th training forward pass sends ``count`` SIGINTs."""
    build_model = train.build_model

    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        forwards = [0]  # training forward passes so far (a list: the hook below adds to it)

        def hook(module, _inputs):
            if module.training:
                forwards[0] += 1
                if forwards[0] == step:
                    _interrupt(count)

        model.register_forward_pre_hook(hook)
        return model

    train.build_model = build


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    while argv[:1] in (["--slow-checkpoint-write"], ["--sigint"]):
        if argv[0] == "--slow-checkpoint-write":
            slow_checkpoint_writes(float(argv[1]))
            argv = argv[2:]
        else:
            when, count = argv[1], int(argv[2])
            if when == "eval":
                sigint_during_evaluation(count)
            else:
                sigint_during_step(int(when), count)
            argv = argv[3:]
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
