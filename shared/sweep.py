"""Expand a config's ``sweep:`` grid into named runs; print, run or hand them to a cluster launcher.

::

    python -m shared.sweep configs/c100_rn18/sweep_gni.yaml --dry-run      # the 40 train.py commands
    python -m shared.sweep configs/c100_rn18/sweep_gni.yaml --count        # 40
    python -m shared.sweep configs/c100_rn18/sweep_gni.yaml --run          # one after another, locally
    python -m shared.sweep CONFIG --write-list runs.txt                    # one command per line (.json: JSON)
    python -m shared.sweep CONFIG --index "$SLURM_ARRAY_TASK_ID"           # only run I (SLURM arrays)
    python -m shared.sweep CONFIG --index 0 --nproc-per-node 4             # run 0 on 4 GPUs (torchrun)
    python -m shared.sweep CONFIG --index 0 --nproc-per-node 4 --nnodes 2 --rdzv-endpoint HEAD:29500 --rdzv-id J
    python -m shared.sweep CONFIG --wandb-sweep sweep.yaml                 # for `wandb sweep` + `wandb agent`
    python -m shared.sweep CONFIG --run --set output=/scratch/runs --set data_dir=/data/cifar

The grid. ``sweep:`` maps keys to lists of values; the runs are the cartesian product of all lists, in
file order with the last key varying fastest (so ``--index`` numbering is stable). Keys are train.py
argument names (``seed``, ``norm``, ``lr``...) or dotted paths into a mapping argument
(``model_kwargs.block_dropout.p``). The reserved key ``cases`` holds a list of mappings, each setting
several keys at once (one axis of the product), for setups that are not a grid::

    sweep:
      seed: [42, 43, 44]
      cases:
        - {norm: bn}
        - {norm: gni16}
        - {norm: bn, model_kwargs.block_dropout: {subtype: flexible_dropout, kind: gaussian, p: 0.2},
           experiment: "c100-rn18-bn-gedo0.2-s{seed}"}

A dotted path replaces one entry and keeps the rest of the mapping; a plain key replaces the whole value.

Run names. Each run is named by the config's ``experiment`` (usually a template such as
``c100-rn18-{norm}-s{seed}``, formatted by train.py's own config code with the run's resolved
arguments), so the name is stable and readable. It is the run's output directory (``OUTPUT/NAME``)
and its wandb run id, so a requeued run resumes into the same directory and the same wandb run. Two
runs with one name, or a name that is not a plain directory name, are an error.

Commands. Every run is ``python train.py -c CONFIG <swept flags> --experiment NAME --resume auto``:
the swept values are passed as train.py flags, and each command is checked by parsing it with
train.py's own parser (the values must come back as the sweep set them). ``--resume auto`` starts fresh
or continues from the run directory's last checkpoint. ``--run`` and ``--index`` skip runs whose
``results.json`` says ``finished``. With ``--nproc-per-node G > 1`` the command is
``PYTHON -m torch.distributed.run --standalone --nproc-per-node G train.py ...`` (torchrun, found next
to this interpreter: no activated venv or PATH needed). With ``--nnodes N > 1`` (one launcher per node,
as ``experiment_scripts/slurm_array.sbatch`` starts them with ``srun``) it is
``... --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID``.

Signals. While a run executes, the first SIGUSR1 or SIGTERM sent to this process is forwarded to
train.py (to torchrun as SIGTERM, which it passes on to its workers); later ones are not forwarded,
because a second signal makes torchrun abandon its workers while they checkpoint. Every train.py process
then stops at the same update boundary (they agree through an all-reduce), rank 0 writes one checkpoint
and ``results.json`` with status ``preempted``, and the workers exit with :data:`PREEMPTED_EXIT_CODE`.
torchrun itself exits 1 after a signal, whatever its workers did, so this process decides the exit code
from the run's outcome: a ``results.json`` written during this launch with status ``preempted`` means
:data:`PREEMPTED_EXIT_CODE` (it waits up to ``GHOST_NOISE_PREEMPT_GRACE_S``, default 60 s, for it after
a signal). ``experiment_scripts/slurm_array.sbatch`` turns that code into a requeue.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import yaml

from shared import config, run_files
from shared.config import EXIT_USAGE, PREEMPTED_EXIT_CODE, SWEEP_CASES_KEY, SWEEP_KEY, ConfigError

# A name is used as a directory name and as a wandb run id: keep it to characters both accept.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
_TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"


# A sweep that cannot be expanded (bad grid, unknown key, duplicate or invalid run names) is bad input of the
# config kind: one exception type, so a config's own error needs no translation on its way to main.
SweepError = ConfigError


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep.

    Attributes:
        index: position in the sweep (what ``--index`` selects).
        name: the run name (= experiment = output subdirectory = wandb run id).
        point: the values this run sets, ``{key or dotted path: value}``, in grid order.
        args: train.py arguments after ``train.py`` (starts with ``-c CONFIG``).
        output_dir: the run directory, ``OUTPUT/NAME``.
        device: train.py's resolved ``--device`` (None: CUDA if available, else CPU).
    """
    index: int
    name: str
    point: Mapping[str, Any]
    args: tuple
    output_dir: Path
    device: Optional[str] = None


def _parse(argv: Sequence[str]) -> dict:
    """Resolve ``argv`` the way train.py does; argparse's exit and a template error name the command."""
    try:
        return vars(config.parse_args(list(argv)))
    except SystemExit as error:
        raise SweepError(f"train.py rejects the arguments {shlex.join(argv)} (exit {error.code})") from None
    except ConfigError as error:  # a template that does not fit this run's values
        raise SweepError(f"{shlex.join(argv)}: {error}") from None


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------

def _points(grid: Mapping[str, list], where: str) -> list:
    """The runs' ``{key or dotted path: value}`` assignments: the product of the grid's axes.

    ``grid`` is a ``sweep:`` that :func:`shared.config.load_config` has checked; each key is an axis
    of one-key assignments, except ``cases``, an axis of several-key assignments.
    """
    axes = [[dict(case) for case in values] if key == SWEEP_CASES_KEY
            else [{key: value} for value in values] for key, values in grid.items()]
    points = []
    for combination in itertools.product(*axes):
        point: dict = {}
        for assignment in combination:
            for key, value in assignment.items():
                if key in point:
                    raise SweepError(f"{where}: {key!r} is set by two sweep axes; set it in one only")
                point[key] = value
        points.append(point)
    return points


def _set_path(config: dict, path: str, value: Any, where: str) -> None:
    """``config[a][b][c] = value`` for ``path = 'a.b.c'``, creating empty mappings on the way."""
    keys = path.split(".")
    target = config
    for depth, key in enumerate(keys[:-1]):
        child = target.get(key)
        if child is None:
            child = target[key] = {}
        elif not isinstance(child, dict):
            raise SweepError(f"{where}: cannot set {path!r}: {'.'.join(keys[:depth + 1])!r} is "
                             f"{type(child).__name__} {child!r}, not a mapping")
        target = child
    target[keys[-1]] = copy.deepcopy(value)


# ----------------------------------------------------------------------------------------------
# Values -> train.py flags
# ----------------------------------------------------------------------------------------------

def _long_flag(action: argparse.Action) -> str:
    """The flag's first long name: ``--batch-size`` of ``-b``, ``--log-wandb`` (not ``--no-log-wandb``)."""
    return next(name for name in action.option_strings if name.startswith("--"))


def _text(value: Any) -> str:
    """A value as one command-line word: strings as they are, anything else as JSON (``true``, ``0.1``,
    ``[1,2]``), which argparse's types and the spec parser (YAML) read back."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _flag_tokens(actions: dict, dest: str, value: Any, where: str) -> list:
    """The command-line words that make train.py's ``dest`` equal ``value``."""
    action = actions[dest]
    flag = _long_flag(action)
    if action.nargs == 0:  # store_true / store_false / store_const
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        if value == action.const:
            return [flag]
        if value == action.default:
            return []
        raise SweepError(f"{where}: {dest}={value!r} cannot be given on the command line ({flag} only sets "
                         f"{action.const!r}); set it in the config instead")
    if action.nargs in ("*", "+") or (isinstance(action.nargs, int) and action.nargs > 1):
        if isinstance(value, Mapping):  # key=value: strings as they are, else literals (ParseKwargs' literal_eval)
            return [flag] + [f"{key}={item if isinstance(item, str) else repr(item)}" for key, item in value.items()]
        if isinstance(value, (list, tuple)):
            return [flag] + [_text(item) for item in value]
    return [flag, _text(value)]


# ----------------------------------------------------------------------------------------------
# Expansion
# ----------------------------------------------------------------------------------------------

def _display_path(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter commands)."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    return str(resolved.relative_to(cwd) if resolved.is_relative_to(cwd) else resolved)


def _parse_set(items: Sequence[str]) -> dict:
    """``['output=/x', 'lr=0.1']`` -> ``{'output': '/x', 'lr': 0.1}`` (values read as YAML scalars)."""
    overrides = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--set expects key=value, got {item!r}")
        try:  # the limits of config files
            value = config.load_bounded_yaml(text, f"--set {key.strip()}")[1] if text.strip() else ""
        except yaml.YAMLError:
            value = text
        overrides[key.strip()] = value
    return overrides


def expand(config_path: os.PathLike, overrides: Optional[Mapping[str, Any]] = None,
           only: Optional[str] = None) -> list:
    """Expand a config file's sweep into its runs.

    Args:
        config_path: a YAML config (bases resolved by ``shared.config.load_config``).
        overrides: ``{key or dotted path: value}`` applied to every run (``--set``); may not touch a
            swept key.
        only: keep the runs whose name matches this glob (``fnmatch``), renumbered from 0.

    Returns:
        The :class:`SweepRun` list, in grid order.

    Raises:
        SweepError: bad grid, a key train.py does not know, a value train.py would not read back
            unchanged, an invalid or duplicate run name, or no run left after ``only``.
    """
    path = Path(config_path)
    where = str(path)
    actions = config.actions_by_dest()
    merged = config.load_config(where)
    for key in overrides or {}:
        config.check_key(key, actions, "--set")
    points = _points(merged.pop(SWEEP_KEY, {}), where)
    clash = sorted({key for point in points for key in point} & set(overrides or {}))
    if clash:
        raise SweepError(f"--set {', '.join(clash)}: already swept by {where}; a sweep key cannot be overridden")

    runs = [_make_run(path, merged, point, overrides or {}, actions, index) for index, point in enumerate(points)]
    first_named = {}  # {run name: the index of the first run so named}
    for run in runs:
        first = first_named.setdefault(run.name, run.index)
        if first != run.index:
            raise SweepError(f"{where}: runs {first} ({points[first]}) and {run.index} ({run.point}) are both "
                             f"named {run.name!r}; make the experiment template use the swept keys")
    if only:
        runs = [r for r in runs if fnmatch.fnmatchcase(r.name, only)]
        if not runs:
            raise SweepError(f"{where}: no run name matches --only {only!r}")
        runs = [dataclasses.replace(r, index=i) for i, r in enumerate(runs)]
    return runs


def _make_run(path: Path, merged: dict, point: dict, overrides: Mapping[str, Any], actions: dict,
              index: int) -> SweepRun:
    """Run ``index``: the config with ``point`` and ``overrides`` set, as train.py flags."""
    where = str(path)
    values = copy.deepcopy(merged)
    assignments = {**overrides, **point}
    for key, value in assignments.items():
        _set_path(values, key, value, where)
    touched = list(dict.fromkeys(key.split(".")[0] for key in assignments))
    flags = {dest: _flag_tokens(actions, dest, values[dest], f"{where} (run {index})")
             for dest in touched}
    args = ["-c", _display_path(path)]
    resolved = _parse(args + [word for tokens in flags.values() for word in tokens])
    # The command carries the resolved name instead of a (case's) experiment template.
    args += [word for dest, tokens in flags.items() if dest != "experiment" for word in tokens]
    name = resolved["experiment"]
    if not name:
        raise SweepError(f"{where}: run {index} ({point}) has no experiment name; set "
                         f"`experiment:` to a template such as 'c100-rn18-{{norm}}-s{{seed}}'")
    if not _NAME_PATTERN.match(name):
        raise SweepError(f"{where}: run name {name!r} ({point}) is not a valid directory name / wandb id "
                         f"(letters, digits and . _ = + - only); change the experiment template")
    for dest in touched:
        if dest == "experiment" or any("{" in text for text in config.strings_in(values[dest])):
            continue  # a template or spec text: train.py formats or parses it, so it does not read back as written
        # YAML and argparse both give lists (never tuples), and 1 == 1.0 as argparse turns 1 into 1.0
        if values[dest] != resolved[dest]:
            raise SweepError(f"{where}: train.py reads {dest}={resolved[dest]!r} back from "
                             f"{shlex.join(args)}, but the sweep sets {values[dest]!r}")
    args += ["--experiment", name, "--resume", "auto"]
    return SweepRun(index, name, dict(point), tuple(args), Path(resolved["output"] or "output") / name,
                    resolved["device"])


@dataclasses.dataclass(frozen=True)
class Launch:
    """How many processes train one run, and where they meet.

    Attributes:
        nproc_per_node: training processes on this node (GPUs per node).
        nnodes: nodes; > 1 needs ``rdzv_endpoint`` (``HOST:PORT`` of the first node) and the same
            ``rdzv_id`` on every node.
    """
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: Optional[str] = None
    rdzv_id: str = "ghost-noise"

    def __post_init__(self):
        for flag, count in (("--nproc-per-node", self.nproc_per_node), ("--nnodes", self.nnodes)):
            if count < 1:
                raise SweepError(f"{flag} must be >= 1, got {count}")
        if self.nnodes > 1 and not re.fullmatch(r"[^\s:]+:\d+", self.rdzv_endpoint or ""):
            raise SweepError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (the first node), "
                             f"got {self.rdzv_endpoint!r}")

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1


def train_command(run: SweepRun, python: Optional[str] = None, launch: Launch = Launch()) -> list:
    """The command line that trains ``run`` (from the repository root or any directory).

    A ``launch`` of more than one process runs torchrun as ``python -m torch.distributed.run`` with
    this interpreter, so it is the project's torch without PATH lookups.
    """
    python = python or sys.executable
    script = _display_path(_TRAIN_SCRIPT)
    if not launch.distributed:
        return [python, script, *run.args]
    where = ["--standalone"] if launch.nnodes == 1 else [
        f"--nnodes={launch.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}",
        f"--rdzv-id={launch.rdzv_id}"]
    return [python, "-m", "torch.distributed.run", *where, f"--nproc-per-node={launch.nproc_per_node}",
            script, *run.args]


def run_status(run: SweepRun) -> Optional[str]:
    """``results.json``'s status of a run (``finished``, ``running``, ...), or None if it has none."""
    try:
        return str(json.loads((run.output_dir / "results.json").read_text()).get("status"))
    except (OSError, ValueError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def _outcome(run: SweepRun, code: int, started: float, signalled: bool) -> int:
    """The launch's exit code: the workers' verdict when torchrun's own code (1 after a signal) hides it.

    The verdict is a ``results.json`` with status preempted written during this launch (at or after
    ``started``, epoch seconds), so a ``preempted`` left by an earlier allocation cannot hide a crash of
    this one. After a forwarded signal, waits up to ``$GHOST_NOISE_PREEMPT_GRACE_S`` (60 s) for it:
    torchrun may return before its workers finished checkpointing (a second signal).
    """
    if code in (0, PREEMPTED_EXIT_CODE):
        return code
    deadline = time.time() + (float(os.environ.get("GHOST_NOISE_PREEMPT_GRACE_S", "60")) if signalled else 0.0)
    while True:
        try:  # 1 s: coarse filesystem timestamps
            fresh = (run.output_dir / "results.json").stat().st_mtime >= started - 1.0
        except OSError:
            fresh = False
        if fresh and run_status(run) == "preempted":
            print(f"[sweep] {run.name}: the workers checkpointed after the signal (results.json: preempted); "
                  f"exit {PREEMPTED_EXIT_CODE} instead of the launcher's {code}", flush=True)
            return PREEMPTED_EXIT_CODE
        if time.time() >= deadline:
            return code
        time.sleep(0.5)


def _child_env(launch: Launch) -> Optional[dict]:
    """torchrun handles SIGTERM, SIGINT, SIGHUP, SIGQUIT; SIGUSR1 sent to it directly would kill it."""
    if not launch.distributed or "TORCHELASTIC_SIGNALS_TO_HANDLE" in os.environ:
        return None
    return dict(os.environ, TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")


def execute(run: SweepRun, launch: Launch = Launch()) -> int:
    """Run one training launch, forwarding the first SIGUSR1/SIGTERM to it; return the run's exit code."""
    command = train_command(run, launch=launch)
    print(f"[sweep] run {run.index} {run.name}: {shlex.join(command)}", flush=True)
    started = time.time()
    process = subprocess.Popen(command, env=_child_env(launch))
    received: list = []

    def forward(signum, _frame):
        received.append(signum)
        if len(received) > 1:  # a second SIGTERM makes torchrun drop its workers mid-checkpoint
            print(f"[sweep] got signal {signal.Signals(signum).name} again: already forwarded", flush=True)
            return
        sent = signal.SIGTERM if launch.distributed else signum
        print(f"[sweep] got signal {signal.Signals(signum).name}: forwarding {signal.Signals(sent).name} "
              f"to {run.name} (pid {process.pid})", flush=True)
        process.send_signal(sent)  # a process that has ended is not signalled (Popen checks)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _outcome(run, code, started, bool(received)) if launch.distributed else code


def _run_all(runs: Sequence[SweepRun], launch: Launch) -> int:
    """Run every unfinished run in order, continuing past failures; print a summary."""
    outcomes = []
    for run in runs:
        if run_status(run) == "finished":
            outcomes.append((run, "skipped (finished)", 0.0))
            continue
        start = time.time()
        code = execute(run, launch=launch)
        outcomes.append((run, "ok" if code == 0 else f"exit {code}", time.time() - start))
        if code == PREEMPTED_EXIT_CODE:
            print(f"[sweep] {run.name} was preempted (exit {code}); stopping here", flush=True)
            break
    print("\n[sweep] summary")
    for run, outcome, seconds in outcomes:
        print(f"  {run.index:4d}  {run.name:<40s}  {outcome:<20s}  {seconds:8.1f} s")
    not_run = len(runs) - len(outcomes)
    failed = [outcome for _, outcome, _ in outcomes if outcome not in ("ok", "skipped (finished)")]
    print(f"[sweep] {len(outcomes) - len(failed)} ok or finished, {len(failed)} failed, {not_run} not started")
    if f"exit {PREEMPTED_EXIT_CODE}" in failed:
        return PREEMPTED_EXIT_CODE
    return 1 if failed or not_run else 0


# ----------------------------------------------------------------------------------------------
# Lists for launchers
# ----------------------------------------------------------------------------------------------

def _one_line_command(run: SweepRun, launch: Launch) -> str:
    """The run's command as one shell line; a value with a line break would split it, so it is refused
    (shell quoting keeps a newline inside quotes, but line-based launchers read one line per run)."""
    command = train_command(run, launch=launch)
    # str.splitlines breaks at every character a line-based reader may take for a line end
    broken = next((word for word in command if "".join(word.splitlines()) != word), None)
    if broken is not None:
        raise SweepError(f"run {run.index} ({run.name}): the value {broken!r} holds a line break, so its command "
                         f"cannot be one line of a list; remove it (or write a .json list)")
    return shlex.join(command)


def write_list(runs: Sequence[SweepRun], path: os.PathLike, launch: Launch = Launch()) -> None:
    """One shell command per line, or a JSON list of runs if ``path`` ends in ``.json``; written atomically."""
    path = Path(path)
    if path.suffix == ".json":
        records = [dict(index=r.index, name=r.name, output_dir=str(r.output_dir), point=r.point,
                        command=train_command(r, launch=launch)) for r in runs]
        run_files.atomic_write_text(path, json.dumps(records, indent=1, default=str) + "\n")
    else:
        run_files.atomic_write_text(path, "".join(_one_line_command(r, launch) + "\n" for r in runs))


def wandb_sweep(config_path: os.PathLike, runs: Sequence[SweepRun], selection: Sequence[str] = ()) -> dict:
    """A ``wandb sweep`` configuration (method grid) for the same runs.

    A sweep over plain train.py flags with scalar values becomes a grid over those flags with
    ``program: train.py``. Anything a wandb grid cannot express (``cases``, dotted paths, structured
    values, runs that are not every combination of the values) becomes a grid over ``index``, each
    agent call running ``python -m shared.sweep CONFIG --index I``, which gives the same runs and names.
    ``selection``: the ``--only`` / ``--set`` arguments that chose and changed ``runs``; the agent's
    command repeats them (an index grid, so that ``I`` numbers the same runs with the same values).
    """
    actions = config.actions_by_dest()
    config_arg = _display_path(Path(config_path))
    keys = list(dict.fromkeys(k for r in runs for k in r.point))
    point_values = [r.point.get(key) for r in runs for key in keys]  # None where a run does not set a key
    simple = all("." not in key and actions[key].nargs is None for key in keys) and all(
        isinstance(value, (str, int, float)) and not isinstance(value, bool) for value in point_values)
    values = {key: list(dict.fromkeys(r.point[key] for r in runs)) for key in keys} if simple else {}
    base = {"name": Path(config_path).stem, "method": "grid", "program": _display_path(_TRAIN_SCRIPT)}
    # A grid over flags runs every combination of their values: right only if the runs are all of them
    if values and not selection and math.prod(len(v) for v in values.values()) == len(runs):
        parameters = {_long_flag(actions[key])[2:]: {"values": v} for key, v in values.items()}
        return {**base, "parameters": parameters,
                "command": ["${env}", "${interpreter}", "${program}", "-c", config_arg, "--resume", "auto", "${args}"]}
    return {**base, "parameters": {"index": {"values": [r.index for r in runs]}},
            "command": ["${env}", "${interpreter}", "-m", "shared.sweep", config_arg, *selection, "${args}"]}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config with a `sweep:` grid (a config without one is a single run)")
    parser.add_argument("--dry-run", action="store_true", help="print every run's name and command (default)")
    parser.add_argument("--run", action="store_true", help="run the unfinished runs one after another")
    parser.add_argument("--index", type=int,
                        help="run only run I (0-based; e.g. $SLURM_ARRAY_TASK_ID); skipped if finished")
    parser.add_argument("--count", action="store_true", help="print the number of runs")
    parser.add_argument("--write-list", metavar="FILE", help="write one command per line (FILE.json: a JSON list)")
    parser.add_argument("--wandb-sweep", metavar="FILE", help="write a wandb sweep YAML for `wandb sweep FILE`")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value for every run (repeatable; dotted keys allowed)")
    parser.add_argument("--only", metavar="GLOB", help="keep only runs whose name matches GLOB (renumbered)")
    parser.add_argument("--nproc-per-node", type=int, default=int(os.environ.get("GPUS_PER_TASK", "1")),
                        help="GPUs per run: > 1 launches train.py with torchrun (default: $GPUS_PER_TASK or 1)")
    parser.add_argument("--nnodes", type=int, default=1,
                        help="nodes per run, one launcher per node (multi-node torchrun with a c10d rendezvous)")
    parser.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="the first node's HOST:PORT (--nnodes > 1)")
    parser.add_argument("--rdzv-id", default="ghost-noise", help="rendezvous id, the same on every node (a job id)")
    parser.add_argument("--require-gpu", action="store_true",
                        help="with --index: refuse (exit 2) to start a run whose --device is not cpu when "
                             "this machine has no CUDA device (instead of training on the CPU)")
    return parser


def _run_index(runs: Sequence[SweepRun], options: argparse.Namespace, launch: Launch) -> int:
    """``--index I``: run I unless it is finished (SLURM array tasks, wandb agents); with ``--require-gpu``
    a run meant for a GPU (its device is not ``cpu``) is refused where there is no CUDA device."""
    if not 0 <= options.index < len(runs):
        raise SweepError(f"--index {options.index} is out of range: {options.config} has {len(runs)} runs "
                         f"(valid: 0..{len(runs) - 1})")
    run = runs[options.index]
    if run_status(run) == "finished":
        print(f"[sweep] run {run.index} {run.name} is finished ({run.output_dir}); nothing to do")
        return 0
    if options.require_gpu and not str(run.device or "cuda").startswith("cpu") and not torch.cuda.is_available():
        raise SweepError(f"run {run.index} {run.name} trains on device {run.device or 'cuda (default)'!r}, but this "
                         f"allocation has no CUDA device (torch.cuda.is_available() is False): request GPUs "
                         f"(sbatch --gres=gpu:G), or allow CPU training (ALLOW_CPU=1 / without --require-gpu)")
    return execute(run, launch=launch)


def main(argv: Optional[Sequence[str]] = None) -> int:
    options = _build_parser().parse_args(argv)
    try:
        launch = Launch(options.nproc_per_node, options.nnodes, options.rdzv_endpoint, options.rdzv_id)
        runs = expand(options.config, _parse_set(options.set), options.only)
        if options.count:
            print(len(runs))
        if options.write_list:
            write_list(runs, options.write_list, launch=launch)
            print(f"wrote {len(runs)} commands to {options.write_list}", file=sys.stderr)
        if options.wandb_sweep:
            selection = ([f"--only={options.only}"] if options.only else []) + [f"--set={kv}" for kv in options.set]
            spec = wandb_sweep(options.config, runs, selection)
            header = f"# generated by: python -m shared.sweep {options.config} --wandb-sweep {options.wandb_sweep}\n"
            run_files.atomic_write_text(Path(options.wandb_sweep), header + yaml.safe_dump(spec, sort_keys=False))
            print(f"wrote wandb sweep ({len(runs)} runs) to {options.wandb_sweep}", file=sys.stderr)
        if options.index is not None:
            return _run_index(runs, options, launch)
        if options.run:
            return _run_all(runs, launch)
        if options.dry_run or not (options.count or options.write_list or options.wandb_sweep):
            for run in runs:
                print(f"# [{run.index}] {run.name}")
                print(_one_line_command(run, launch))
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader of stdout stopped early (`--dry-run | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit fails quietly
        return 1
    except OSError as error:  # an output file (--write-list, --wandb-sweep) that cannot be written
        print(f"error: cannot write {error.filename}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
