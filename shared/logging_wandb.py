"""Weights & Biases logging that never blocks or crashes training.

* Offline by itself: with no ``WANDB_MODE`` set and no credentials (``WANDB_API_KEY`` or a netrc entry
  for wandb), the run is logged offline into the run directory and the ``wandb sync`` command is printed.
* One wandb run per run directory: a random run id is made on the first start and kept in
  ``RUN_DIR/wandb_run_id.txt``, so a resumed or requeued run logs into the same wandb run
  (``resume="allow"``) and a run of the same name in another output folder into its own.
* Any wandb failure (not installed, bad settings, a crash mid-run) becomes one warning; after it every
  call is a no-op and training and the local logs (summary.csv, results.json) go on.
"""
from __future__ import annotations

import netrc
import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["WandbLogger", "RUN_ID_FILE"]

RUN_ID_FILE = "wandb_run_id.txt"


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def _run_id(run_dir: Path, name: str) -> str:
    """The run directory's wandb id: the stored one (also one an earlier version stored), else a new
    random one, stored for the resumes. Random, not the run name: two run directories with the same
    experiment name (another --output) are two wandb runs, not one merged run."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    run_id = uuid.uuid4().hex[:16]
    from shared.run_files import atomic_write_text  # a kill mid-write must not leave an empty id

    atomic_write_text(path, run_id + "\n")
    return run_id


class WandbLogger:
    """A wandb run that turns every failure into a warning (see the module docstring).

    Args:
        run_dir: the run's output directory (wandb files go to ``run_dir/wandb``).
        name: the run name (experiment); also the default run id and display name.
        config: the resolved arguments.
        project, tags, display_name: ``--wandb-project``, ``--wandb-tags``, ``--wandb-name``.
        enabled: ``--log-wandb`` on this process (rank 0 only).
    """

    def __init__(self, run_dir: Path, name: str, config: dict, project: Optional[str] = None,
                 tags: Sequence[str] = (), display_name: Optional[str] = None, enabled: bool = True):
        self.run = None
        self.offline = False
        if not enabled:
            return
        try:
            import wandb
        except ImportError as error:
            self._warn(f"wandb is not installed ({error})")
            return
        try:
            # passed explicitly (not through the environment): wandb keeps process-wide settings from
            # its first use, and a second run in the same process must still get its own mode
            mode = os.environ.get("WANDB_MODE") or ("online" if _has_credentials() else "offline")
            self.offline = mode in ("offline", "dryrun")
            self.run = wandb.init(
                mode=mode, project=project or "ghost-noise", name=display_name or name, id=_run_id(run_dir, name),
                resume="allow", dir=str(run_dir), config=config, tags=list(tags) or None,
                settings=wandb.Settings(init_timeout=120))
        except Exception as error:  # wandb raises many types (UsageError, CommError, timeouts...)
            self._warn(f"wandb.init failed: {type(error).__name__}: {error}")
            self.run = None

    @staticmethod
    def _warn(message: str) -> None:
        print(f"WARNING: {message}; training goes on without wandb (local logs are unaffected)",
              file=sys.stderr, flush=True)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _call(self, what: str, function, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            function(*args, **kwargs)
        except Exception as error:
            self._warn(f"wandb {what} failed: {type(error).__name__}: {error}")
            self.run = None

    def log(self, metrics: dict, step: int) -> None:
        """Log metrics at optimizer update ``step``."""
        if self.run is not None:
            self._call("log", self.run.log, metrics, step=step)

    def summary(self, values: dict) -> None:
        """Set the run's summary (final and best metrics)."""
        if self.run is not None:
            self._call("summary", self.run.summary.update, values)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; offline runs print how to upload them."""
        if self.run is None:
            return
        directory = getattr(self.run, "dir", None)
        self._call("finish", self.run.finish, exit_code=exit_code)
        if self.offline and directory:
            print(f"wandb: offline run saved; upload it with: wandb sync {Path(directory).parent}", flush=True)
        self.run = None
