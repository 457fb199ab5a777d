"""Test-only entry point: train.py with faults injected by patching, then ``train.main``.

    python tests/fault_injection.py --slow-checkpoint-write 1.5 [train.py arguments...]

``--slow-checkpoint-write S``: every checkpoint write stops for S seconds with half of the file written
(a slow disk), so a test can kill the process while ``last.pth.tar.tmp`` is half-written. Production
code reads no test switch; the patch replaces the writer that :mod:`shared.checkpoint` calls.
"""
from __future__ import annotations

import io
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--slow-checkpoint-write"]:
        slow_checkpoint_writes(float(argv[1]))
        argv = argv[2:]
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
