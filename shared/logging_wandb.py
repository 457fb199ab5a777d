"""Weights & Biases logging that never blocks or crashes training.

* Offline by itself: with no ``WANDB_MODE`` set and no credentials (``WANDB_API_KEY`` or a netrc entry
  for wandb), the run is logged offline into the run directory and the ``wandb sync`` command is printed.
* One wandb run per run directory: a random run id is made on the first start and kept in
  ``RUN_DIR/wandb_run_id.txt``, so a resumed or requeued run logs into the same wandb run
  (``resume="allow"``) and a run of the same name in another output folder into its own.
* Any wandb failure (not installed, bad settings, a crash mid-run) becomes one warning; after it every
  call is a no-op and training and the local logs (summary.csv, results.json) go on.
* Runs aggregate in the UI: ``group`` is the run's setup (:func:`setup_group`: the run name without its
  seed, so every seed of one sweep case shares it), ``job_type`` the experiment family
  (:func:`experiment_family`), the headline metrics are declared (:data:`HEADLINE_METRICS`) and the config
  holds the resolved arguments plus ``derived`` values (norm sites, world size, per-process batch...).
  The group and job type are stored in the run record, so ``wandb sync`` of an offline run keeps them.
  docs/WANDB.md shows how to read the paper's comparisons in the UI.
"""
from __future__ import annotations

import netrc
import os
import re
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from shared.run_files import atomic_write_text

RUN_ID_FILE = "wandb_run_id.txt"
_SEPARATORS = "-_.=+"
# Logged key (the names train.py logs each epoch) -> summary aggregations wandb keeps for it.
HEADLINE_METRICS = {"eval/top1": "max,last", "eval/top5": "max,last", "eval/eval_loss": "min,last",
                    "train/epoch_loss": "min,last"}


def setup_group(name: str, seed: Any) -> str:
    """The run name without its seed: the wandb group shared by every seed of one setup.

    The seed is the last token of ``name`` that is the seed's digits, optionally written ``s42`` or
    ``seed42`` (or ``seed-42``), between separators (``- _ . = +``) or the ends of the name:
    ``c100-rn18-gni16-s42`` (seed 42) -> ``c100-rn18-gni16``; ``rn18`` is not mistaken for seed 18. A
    name without its seed is its own group (a run named by hand is one setup).
    """
    if seed is None or isinstance(seed, bool):
        return name
    pattern = re.compile(rf"(?:^|(?<=[{re.escape(_SEPARATORS)}]))(?:seed|s)?[-_=]?{re.escape(str(seed))}"
                         rf"(?=$|[{re.escape(_SEPARATORS)}])")
    matches = list(pattern.finditer(name))
    if not matches:
        return name
    last = matches[-1]
    head, tail = name[:last.start()].rstrip(_SEPARATORS), name[last.end():].lstrip(_SEPARATORS)
    joined = head + (name[last.start() - 1] if head and tail else "") + tail
    return joined or name


def experiment_family(args: Mapping[str, Any]) -> str:
    """``DATASET-MODEL`` (``cifar10-cifar_resnet20``): runs whose results are compared with each other.

    The dataset is ``--dataset`` without timm's ``torch/`` prefix, else the name of ``--data-dir``.
    """
    dataset = str(args.get("dataset") or "").split("/")[-1]
    if not dataset and args.get("data_dir"):
        dataset = Path(str(args["data_dir"]).rstrip("/")).name
    return f"{dataset or 'data'}-{args.get('model') or 'model'}"


def derived_config(model, world_size: int, per_process_batch: int, global_batch: int, args: Mapping[str, Any],
                   site_report: Optional[Mapping[str, Any]] = None) -> dict:
    """Values train.py derives from the arguments, for the wandb config's ``derived`` entry.

    ``norm_sites`` counts the model's norm sites by module type (:func:`shared.specs.census`:
    what the ``--norm`` spec put in place); ``method`` (the norm spec without its ghost
    batch size, :func:`shared.report.describe_norm`), and the x-axis the paper plots the setup on
    (:func:`shared.report.axis_of`): ``x_axis`` with ``ghost_batch_size`` or ``dropout_p``, numbers a
    wandb scatter plot can use. ``site_report`` (e.g. the noise sites a model family reports) is logged
    as given under ``sites``.
    """
    from shared.report import axis_of, describe_norm  # imported here: shared.report imports this module
    from shared.specs import census

    kind, x = axis_of(dict(args))
    derived = {"world_size": int(world_size), "per_process_batch": int(per_process_batch),
               "global_batch": int(global_batch), "norm_sites": census(model)["norm_sites"],
               "method": describe_norm(args.get("norm"))[0], "x_axis": kind,
               "ghost_batch_size": x if kind == "ghost_batch_size" else None,
               "dropout_p": x if kind == "dropout_p" else None}
    if site_report:
        derived["sites"] = dict(site_report)
    return derived


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return any("wandb" in host for host in netrc.netrc().hosts)
    except (OSError, netrc.NetrcParseError):  # no ~/.netrc, or one that is not readable
        return False


def _run_id(run_dir: Path, name: str) -> str:
    """The run directory's wandb id: the stored one (also one an earlier version stored), else a new
    random one, stored for the resumes. Random, not the run name: two run directories with the same
    experiment name (another --output) are two wandb runs, not one merged run."""
    path = run_dir / RUN_ID_FILE
    stored = path.read_text().strip() if path.is_file() else ""
    if stored:
        return stored
    run_id = uuid.uuid4().hex[:16]
    atomic_write_text(path, run_id + "\n")  # a kill mid-write must not leave an empty id
    return run_id


class WandbLogger:
    """A wandb run that turns every failure into a warning (see the module docstring).

    Args:
        run_dir: the run's output directory (wandb files go to ``run_dir/wandb``).
        name: the run name (experiment); also the default run id and display name.
        config: the resolved arguments.
        project, tags, display_name: ``--wandb-project``, ``--wandb-tags``, ``--wandb-name``.
        enabled: ``--log-wandb`` on this process (rank 0 only).
        derived: values derived from the arguments (:func:`derived_config`), logged as ``derived``.

    wandb's group is :func:`setup_group` of ``name`` and ``config['seed']``, its job type
    :func:`experiment_family` of ``config``.
    """

    def __init__(self, run_dir: Path, name: str, config: dict, project: Optional[str] = None,
                 tags: Sequence[str] = (), display_name: Optional[str] = None, enabled: bool = True,
                 derived: Optional[Mapping[str, Any]] = None):
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
                resume="allow", dir=str(run_dir), config={**config, "derived": dict(derived or {})},
                tags=list(tags) or None, group=setup_group(name, config.get("seed")),
                job_type=experiment_family(config), settings=wandb.Settings(init_timeout=120))
            for key, summary in HEADLINE_METRICS.items():  # plotted against the epoch by default
                self.run.define_metric(key, step_metric="epoch", summary=summary)
        except Exception as error:  # wandb raises many types (UsageError, CommError, timeouts...)
            self._warn(f"wandb.init failed: {type(error).__name__}: {error}")
            self.run = None

    @staticmethod
    def _warn(message: str) -> None:
        print(f"WARNING: {message}; training goes on without wandb (local logs are unaffected)",
              file=sys.stderr, flush=True)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _call(self, what: str, function: Callable) -> None:
        """``function(self.run)``, a no-op without a run; a failure is warned about and ends the wandb run."""
        if self.run is None:
            return
        try:
            function(self.run)
        except Exception as error:
            self._warn(f"wandb {what} failed: {type(error).__name__}: {error}")
            self.run = None

    def log(self, metrics: dict, step: int) -> None:
        """Log metrics at optimizer update ``step``."""
        self._call("log", lambda run: run.log(metrics, step=step))

    def summary(self, values: dict) -> None:
        """Set the run's summary (final and best metrics)."""
        self._call("summary", lambda run: run.summary.update(values))

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; offline runs print how to upload them."""
        if self.run is None:
            return
        directory = getattr(self.run, "dir", None)
        self._call("finish", lambda run: run.finish(exit_code=exit_code))
        if self.offline and directory:
            print(f"wandb: offline run saved; upload it with: wandb sync {Path(directory).parent}", flush=True)
        self.run = None
