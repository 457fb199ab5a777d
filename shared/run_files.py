"""The files of a run directory ``OUTPUT/EXPERIMENT/`` and the checks made before writing into one.

``args.yaml`` (the resolved arguments), ``summary.csv`` (one row per finished epoch) and
``results.json`` (status, final and best metrics) are rewritten whole and atomically (temporary file,
then rename), so a reader never sees half a file and a killed run leaves the last complete version.
``summary.csv`` is rebuilt from the history held in the checkpoint, so after a resume it holds exactly
the epochs the resumed run has, each once.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = [
    "SUMMARY_COLUMNS",
    "OPERATIONAL_KEYS",
    "RunDirError",
    "atomic_write_text",
    "atomic_write_bytes",
    "write_summary",
    "write_results",
    "read_results",
    "changed_result_keys",
    "prepare_run_dir",
]

SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "top1", "top5", "lr", "time")

# Arguments that change where or how a run is executed but not its numbers: a resume may change them.
# Every other argument (model, norm, data splits, batch size, seed, schedule...) must match the
# checkpoint's unless --resume-allow-changes is given.
OPERATIONAL_KEYS = frozenset({
    "config", "data_dir", "dataset_download", "output", "experiment", "resume", "resume_allow_changes",
    "stop_after", "log_wandb", "wandb_project", "wandb_tags", "wandb_name", "log_interval", "checkpoint_hist",
    "workers", "pin_mem", "device", "local_rank", "validation_batch_size", "nonfinite", "torchcompile",
    "log_noise_every",
})


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (not writable, holds another run...)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync, then a rename:
    a reader (or a later run after a kill) sees the old complete file or the new one, never a part."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 and value != 0 else f"{value:.6f}".rstrip("0").rstrip(".")
    return str(value)


def write_summary(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``summary.csv``: the fixed columns first, then any extra ones (EMA metrics) in first-seen order."""
    columns = list(SUMMARY_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    atomic_write_text(run_dir / "summary.csv", buffer.getvalue())


def write_results(run_dir: Path, results: Mapping[str, Any]) -> None:
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1, sort_keys=True) + "\n")


def read_results(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None


def changed_result_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list:
    """``[(key, saved value, current value)]`` for every result-changing argument that differs."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        if key in OPERATIONAL_KEYS:
            continue
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if old != new:
            changed.append((key, old, new))
    return changed


def prepare_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and prove it writable before any training work starts.

    Raises:
        RunDirError: the directory cannot be created or written (read-only filesystem, permissions,
            a file in the way, disk full).
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok\n")
        probe.unlink()
    except OSError as error:
        raise RunDirError(f"output directory {run_dir} cannot be written: {error.strerror or error}; "
                          f"choose another --output") from None


def format_changes(changes: Iterable[tuple]) -> str:
    return "\n".join(f"  {key}: checkpoint {old!r} != now {new!r}" for key, old, new in changes)
