"""The files of a run directory ``OUTPUT/EXPERIMENT/`` and the checks made before writing into one.

``args.yaml`` (the resolved arguments), ``summary.csv`` (one row per finished epoch) and
``results.json`` (status, final and best metrics) are rewritten whole and atomically (temporary file,
then rename), so a reader never sees half a file and a killed run leaves the last complete version.
``summary.csv`` is rebuilt from the history held in the checkpoint, so after a resume it holds exactly
the epochs the resumed run has, each once.

One writer per directory: :class:`RunLock` holds an exclusive kernel lock (``flock``) on
``OUTPUT/EXPERIMENT/train.lock`` for the whole run; the kernel drops it when the process ends, however
it ends, so a requeued job never meets a stale lock. Results are never overwritten: a directory that
holds a run's results (:data:`RESULT_NAMES`) is resumed or refused, and ``--start-fresh`` first moves
them into ``superseded-TIMESTAMP/`` (:func:`move_results_aside`).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import yaml

from shared.config import load_bounded_yaml

# timm's train.py column names (timm.utils.update_summary: "train_" / "eval_" + metric), plus "time".
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "time")
# Names written by the previous version of this harness -> timm's names. The one place that knows
# them: every reader of summary.csv rows or results.json's final/best goes through timm_metric_names.
PREVIOUS_METRIC_NAMES = {"top1": "eval_top1", "top5": "eval_top5", "ema_top1": "ema_eval_top1",
                         "ema_top5": "ema_eval_top5"}

# Arguments that change where or how a run is executed but not its numbers: a resume may change them.
# Every other argument (model, norm, data splits, batch size, seed, schedule...) must match the
# checkpoint's unless --resume-allow-changes is given.
OPERATIONAL_KEYS = frozenset({
    "config", "data_dir", "dataset_download", "output", "experiment", "resume", "resume_allow_changes",
    "start_fresh",
    "stop_after", "log_wandb", "wandb_project", "wandb_tags", "wandb_name", "log_interval", "checkpoint_hist",
    "workers", "pin_mem", "device", "local_rank", "validation_batch_size", "nonfinite", "torchcompile",
    "no_resume_opt", "dry_loader", "log_noise_every",
})


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (not writable, holds another run...)."""


# What a full disk or an exhausted quota means, in words (the errno names alone are cryptic).
_NO_SPACE = {errno.ENOSPC: "the disk (or its inodes) is full", errno.EDQUOT: "your disk quota is used up"}


def describe_os_error(error: OSError) -> str:
    """``error``'s message, saying plainly when the cause is a full disk or an exhausted quota."""
    text = error.strerror or str(error)
    if error.errno in _NO_SPACE:
        return f"{text}: {_NO_SPACE[error.errno]}; free space or choose another --output"
    return text


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort: some filesystems refuse to open one)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def _replacing(path: os.PathLike, shared: bool = False) -> Iterator[Path]:
    """Yield ``NAME.tmp`` to be filled; then rename it over ``NAME`` or, on any failure, remove it.

    A rename within one filesystem is atomic, so a reader (or a process killed at any moment) sees the
    old file or the new one, never a mixture; ``path`` is left as it was when filling fails. ``shared``:
    several processes may write ``path`` at once (a cache), so each fills its own ``NAME.PID.tmp``.
    """
    path = Path(path)
    temporary = path.with_name(path.name + (f".{os.getpid()}.tmp" if shared else ".tmp"))
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # never created, or a directory in the way
            temporary.unlink()
        raise
    _fsync_directory(path.parent)


def atomic_write(path: os.PathLike, write: Callable[[BinaryIO], None], shared: bool = False) -> None:
    """Write ``path`` whole or not at all: ``write(handle)`` into ``NAME.tmp``, fsync, rename over ``NAME``.

    On any failure the temporary file is removed and the error raised again; ``path`` is left as it was.
    ``shared``: other processes may write ``path`` at the same time (see :func:`_replacing`).
    """
    with _replacing(path, shared) as temporary, open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_link(source: os.PathLike, target: os.PathLike) -> None:
    """Make ``target`` a hard link to ``source`` (a copy where links are not supported), atomically.

    A link costs no copy; a later atomic rename over ``source`` gives it a new file, so the link keeps
    the content it was made with.
    """
    try:
        with _replacing(target) as temporary:
            temporary.unlink(missing_ok=True)  # a killed process's leftover: os.link does not replace files
            os.link(source, temporary)
    except OSError:  # filesystems without hard links
        with open(source, "rb") as original:
            atomic_write(target, lambda handle: shutil.copyfileobj(original, handle))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def timm_metric_names(row: Mapping[str, Any]) -> dict:
    """A summary row or results.json's ``final``/``best`` with previous names (``top1``...) renamed to timm's.

    Rows already in timm's names come back unchanged (as a new dict).
    """
    return {PREVIOUS_METRIC_NAMES.get(key, key): value for key, value in row.items()}


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """``header`` and ``rows`` as CSV text (``\\n`` line ends), for an atomic write."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    """A float in at most 6 decimals (6 significant digits below 1e-3); other values as csv writes them."""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 and value != 0 else f"{value:.6f}".rstrip("0").rstrip(".")
    return value


class RunFileError(RuntimeError):
    """``summary.csv``/``results.json`` could not be written (disk full, quota...): the message says why."""


def write_run_file(path: Path, text: str) -> None:
    """:func:`atomic_write_text`, raising :class:`RunFileError` (which names the file and the cause)."""
    try:
        atomic_write_text(path, text)
    except OSError as error:
        raise RunFileError(f"could not write {path}: {describe_os_error(error)}; its previous version "
                           f"(if any) is intact") from error


def write_summary(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``summary.csv``: the fixed columns first, then any extra ones (EMA metrics) in first-seen order."""
    columns = list(SUMMARY_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    text = csv_text(columns, ([_cell(row.get(column)) for column in columns] for row in rows))
    write_run_file(run_dir / "summary.csv", text)


def write_results(run_dir: Path, results: Mapping[str, Any]) -> None:
    write_run_file(run_dir / "results.json", json.dumps(results, indent=1, sort_keys=True) + "\n")


def read_args(run_dir: Path) -> dict:
    """``run_dir/args.yaml``: the resolved arguments train.py wrote there.

    Raises:
        OSError: the file cannot be read. ValueError: it is not UTF-8 YAML, nests or expands too far
            (:func:`shared.config.load_bounded_yaml`), or holds something other than a mapping.
    """
    path = Path(run_dir) / "args.yaml"
    try:
        args = load_bounded_yaml(path.read_text(encoding="utf-8"), str(path))[1] or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(args, dict):
        raise ValueError(f"args.yaml holds a {type(args).__name__}, not a mapping of arguments")
    return args


def read_results(run_dir: Path) -> dict:
    """results.json, the metric names of ``final`` and ``best`` in timm's form (also for a run of the
    previous version: :func:`timm_metric_names`).

    Raises:
        OSError: it cannot be read. ValueError: it is not JSON or not a mapping (the message says which).
    """
    results = json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))
    if not isinstance(results, dict):
        raise ValueError(f"a {type(results).__name__}, not a mapping")
    for section in ("final", "best"):
        if isinstance(results.get(section), Mapping):
            results[section] = timm_metric_names(results[section])
    return results


def changed_result_keys(saved: Mapping[str, Any], current: Mapping[str, Any],
                        defaults: Optional[Mapping[str, Any]] = None) -> list:
    """``[(key, saved value, current value)]`` for every result-changing argument that differs.

    ``defaults`` stand in for arguments a checkpoint of an older version lacks (a flag added since).
    """
    changed = []
    defaults = defaults or {}
    for key in sorted((set(saved) | set(current)) - OPERATIONAL_KEYS):
        old, new = saved.get(key, defaults.get(key, "<absent>")), current.get(key, "<absent>")
        if old != new:
            changed.append((key, old, new))
    return changed


def prepare_run_dir(run_dir: Path) -> "RunLock":
    """Create ``run_dir`` and take its lock (:class:`RunLock`) before anything else is written there.

    Creating the lock file also proves the directory writable before any training work starts.

    Raises:
        RunDirError: the directory cannot be created or written (read-only filesystem, permissions,
            a file in the way, disk full), or another run holds it.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return RunLock(run_dir)
    except OSError as error:
        raise RunDirError(f"output directory {run_dir} cannot be written: {describe_os_error(error)}; "
                          f"choose another --output") from None


def format_changes(changes: Iterable[tuple]) -> str:
    return "\n".join(f"  {key}: checkpoint {old!r} != now {new!r}" for key, old, new in changes)


# ----------------------------------------------------------------------------------------------
# One writer per run directory, results never overwritten, names that stay inside --output
# ----------------------------------------------------------------------------------------------

LOCK_NAME = "train.lock"
# What a run leaves behind: a directory holding any of these has results that a new run must not overwrite.
RESULT_NAMES = ("args.yaml", "summary.csv", "results.json", "last.pth.tar", "model_best.pth.tar",
                "wandb_run_id.txt")


class RunLock:
    """An exclusive ``flock`` on ``run_dir/train.lock``, held until :meth:`release` or process exit.

    The lock belongs to the open file, not to the file's existence: the kernel releases it when the
    process dies (SIGKILL, node crash on a local disk), so the file staying behind means nothing and
    there is no stale lock to guess about. The file records the holder (host, pid, start time) so a
    refused run can name it. On NFS (v4, or v3 with lockd) Linux implements ``flock`` with the
    server's byte-range locks, which are seen by every client; Lustre needs the ``flock`` mount option
    (``localflock`` locks one node only); a filesystem without locks makes :class:`RunLock` warn.

    Raises:
        RunDirError: another process holds the lock (the message names it).
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.descriptor: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.descriptor, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            self.release()
            raise RunDirError(f"{run_dir} is in use by another run ({holder}); wait for it to end, or choose "
                              f"another --experiment") from None
        except OSError as error:  # ENOLCK, EOPNOTSUPP...: a filesystem without (cluster-wide) locks
            warnings.warn(f"cannot lock {self.path} ({error.strerror}): a second run started on this "
                          f"directory would not be detected", RuntimeWarning, stacklevel=2)
        os.ftruncate(self.descriptor, 0)
        os.pwrite(self.descriptor, f"host {socket.gethostname()} pid {os.getpid()} since "
                                   f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(), 0)

    def release(self) -> None:
        """Unlock and close the file (the file stays: removing it could race a new holder).

        Unlocking explicitly matters: forked children (DataLoader workers, persistent ones included)
        share the open file, and a plain close would leave the lock held until the last of them exits.
        """
        if self.descriptor is not None:
            with contextlib.suppress(OSError):  # a filesystem without locks: nothing to release
                fcntl.flock(self.descriptor, fcntl.LOCK_UN)
            os.close(self.descriptor)
            self.descriptor = None


class _NoLock:
    """What processes other than 0 hold: process 0 alone locks the run directory for all of them."""

    def release(self) -> None:
        pass


NO_LOCK = _NoLock()


def refuse_if_results(run_dir: Path) -> None:
    """Raise :class:`RunDirError` naming what ``run_dir`` holds, if it holds a run's results."""
    found = holds_results(run_dir)
    if not found:
        return
    names = ", ".join(path.name for path in found[:6]) + (", ..." if len(found) > 6 else "")
    how = ("continue it with --resume auto, " if (run_dir / "last.pth.tar").is_file() else
           "it has no last.pth.tar to continue from (--resume auto cannot continue it); ")
    raise RunDirError(f"{run_dir} already holds a run ({names}): {how}pass --start-fresh to move its results "
                      f"into {run_dir}/superseded-TIMESTAMP/ and start anew, or choose another --experiment")


def check_experiment_name(name: str) -> None:
    """Reject an ``--experiment`` that would put the run directory outside ``--output`` (or be it).

    Sub-folders (``sweep1/bn-s0``) are fine; absolute paths, ``..`` components and ``.`` are not.
    """
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or not parts or os.path.normpath(name) == ".":
        raise RunDirError(f"--experiment {name!r} must be a relative name inside --output without '..' "
                          f"(e.g. 'c10-gni16-s0' or 'sweep/c10-gni16-s0')")


def holds_results(run_dir: Path) -> list:
    """The result files (:data:`RESULT_NAMES`, ``checkpoint-*.pth.tar``) directly in ``run_dir``."""
    found = [run_dir / name for name in RESULT_NAMES if (run_dir / name).exists()]
    return found + sorted(run_dir.glob("checkpoint-*.pth.tar"))  # --checkpoint-hist's numbered copies


def move_results_aside(run_dir: Path) -> Optional[Path]:
    """Move every result file and ``wandb/`` into ``run_dir/superseded-TIMESTAMP/``; nothing is deleted.

    ``args.yaml`` becomes ``args.superseded.yaml`` there, so tools that find runs by their
    ``args.yaml`` (``shared.report``) do not count the old run a second time. Returns the folder, or
    None when there was nothing to move.
    """
    moving = holds_results(run_dir) + ([run_dir / "wandb"] if (run_dir / "wandb").is_dir() else [])
    if not moving:
        return None
    aside = run_dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while aside.exists():
        aside, suffix = run_dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}", suffix + 1
    aside.mkdir()
    for path in moving:
        os.replace(path, aside / ("args.superseded.yaml" if path.name == "args.yaml" else path.name))
    return aside
