#!/usr/bin/env python3
"""Train a timm model with a norm/noise spec: the ghost-noise training harness.

    python train.py -c configs/c100_rn18/test_all.yaml --seed 43
    python train.py --dataset digits --model cifar_resnet20 --norm gni16 -b 64 --lr 0.1 --epochs 10
    torchrun --nproc_per_node 4 train.py -c CONFIG --resume auto

Flags keep timm's train.py names (``python train.py --help``); configuration is parsed in
:mod:`shared.config` (defaults < YAML config < command line). The run writes ``OUTPUT/EXPERIMENT/``:
``args.yaml``, ``summary.csv``, ``results.json``, ``last.pth.tar``, ``model_best.pth.tar``,
``checkpoint-EPOCH.pth.tar`` and, with ``--log-wandb``, ``wandb/``.

Read top to bottom: the building blocks (argument checks, model, loss), then :class:`Training`, whose
``__init__`` sets the run up (run directory and its lock, resume decision, data, model, optimizer and
schedule from timm's factories, a restored checkpoint) and whose :meth:`Training.run` loops over epochs
(:meth:`Training.train_one_epoch`, :func:`shared.validate.evaluate`), checkpointing after each
(:meth:`Training.save`); last the checkpoint files and :func:`main`, which parses and checks the
arguments and turns bad input into exit code 2. Exit codes:
0 done, 1 crash (or a disk that cannot be written), 2 bad input (also: the run directory is in use
by another run, or holds results), 3 non-finite loss, 75 preempted (SIGTERM/SIGUSR1; checkpointed, requeue
with ``--resume auto``), 130 interrupted (Ctrl-C; checkpointed, continue with ``--resume auto``).
"""
import contextlib
import dataclasses
import difflib
import itertools
import math
import random
import re
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import is_model, list_models, load_checkpoint as timm_load_checkpoint
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, dispatch_clip_grad, distribute_bn
from tqdm import tqdm

import nodo
from nodo.convert import convert_sync_batchnorm  # torch's drops the act of BatchNormAct2d-style layers
from shared import config as config_module
from shared import create_model, data, distributed, run_files, specs
from shared.logging_wandb import WandbLogger, derived_config
from shared.noise_monitor import CSV_NAME, NoiseMonitor
from shared.validate import evaluate, set_norm_hyperparameters
from shared.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from shared.config import (EXIT_FAILED, EXIT_NONFINITE, EXIT_OK, EXIT_USAGE, INTERRUPTED_EXIT_CODE,
                           PREEMPTED_EXIT_CODE)

# Ghost noise layers draw a (B, N) tensor of int64 sample indices per call: B x N above this (512 MiB)
# is a typo, not an experiment (the paper's largest is N = 1024 at B = 256: 262,144 indices).
MAX_GHOST_INDICES = 2 ** 26


class UsageError(ValueError):
    """Bad input found by train.py itself (the modules it calls raise their own ValueError kinds)."""


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/inf."""


class Preempted(Exception):
    """SIGTERM/SIGUSR1/SIGINT arrived; a checkpoint was written at a step boundary."""


# ----------------------------------------------------------------------------------------------
# Signals: SLURM sends SIGTERM (or SIGUSR1 with --signal) before it preempts a job; Ctrl-C sends SIGINT
# (torchrun passes it on to its workers, which run in sessions of their own).
# ----------------------------------------------------------------------------------------------

# the signals received: a handler's only way to reach the loop (cleared by main)
_stop_signal: list = []
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _request_stop(signum, _frame) -> None:
    """Ask the training loop to checkpoint and stop at the next step boundary; a second Ctrl-C aborts."""
    if signum == signal.SIGINT and signal.SIGINT in _stop_signal:
        raise KeyboardInterrupt
    _stop_signal.append(signum)
    again = " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""
    print(f"\nreceived {signal.Signals(signum).name}: checkpointing at the next step boundary{again}",
          file=sys.stderr, flush=True)


def log(info, *parts) -> None:
    if info.is_primary:
        print(*parts, flush=True)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

# Ranges of the numeric flags a typo can push out of any sensible experiment: (dests, test, the rule).
FLAG_RANGES = (
    (("lr",), lambda v: 0 < v <= 100, "positive and at most 100"),
    (("weight_decay",), lambda v: 0 <= v <= 10, "in [0, 10]"),
    (("clip_grad", "bn_eps"), lambda v: v > 0, "positive"),
    (("momentum", "smoothing", "drop", "drop_path"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("mixup_prob", "model_ema_decay", "bn_momentum", "reprob"), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("mixup", "cutmix", "min_lr", "warmup_lr", "checkpoint_hist"), lambda v: v >= 0, ">= 0"),
    (("recount", "img_size"), lambda v: v >= 1, ">= 1"),
    (("batch_size", "validation_batch_size", "epochs", "grad_accum_steps", "log_interval", "eval_interval"),
     lambda v: v >= 1, "a positive integer"),
    (("stop_after",), lambda v: v >= 1, "a positive number of epochs"),
    (("log_noise_every",), lambda v: v >= 1, "a positive number of updates"),
    (("dry_loader",), lambda v: v == 0 or v >= 2, "at least 2 batches (the first is not timed; 0: off)"),
)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args) -> None:
    """Reject values that cannot train before any work is done."""
    for dest, value in sorted(vars(args).items()):
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise UsageError(f"{_flag(dest)} must be a finite number, got {value}")
    for dests, valid, rule in FLAG_RANGES:
        for dest in dests:
            value = getattr(args, dest, None)
            if value is not None and not valid(value):
                raise UsageError(f"{_flag(dest)} must be {rule}, got {value}")
    if args.log_noise_every is not None and args.torchcompile:
        raise UsageError("--log-noise-every cannot be used with --torchcompile (its hooks would recompile the model)")
    if args.resume == "auto" and not args.experiment:
        raise UsageError("--resume auto needs a fixed --experiment name (the run directory to continue)")
    if args.experiment:
        run_files.check_experiment_name(args.experiment)


def build_model(args, num_classes: int, in_chans: int, info) -> nn.Module:
    # the flags' values where they differ from timm's defaults; --model-kwargs overrides them
    flags = {"num_classes": num_classes, "in_chans": in_chans if in_chans != 3 else None,
             "drop_rate": args.drop or None, "drop_path_rate": args.drop_path}
    kwargs = {**{key: value for key, value in flags.items() if value is not None}, **args.model_kwargs}
    base_name = args.model.split(".", 1)[0]
    if not is_model(base_name):
        close = difflib.get_close_matches(base_name, list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models()` lists them"
        raise UsageError(f"--model {args.model!r} is not a timm model{hint}")
    try:
        model = create_model(args.model, norm=args.norm, pretrained=args.pretrained, **kwargs)
    except TypeError as error:  # an unknown model keyword, named by Python in the message
        raise UsageError(f"--model {args.model} with --model-kwargs {args.model_kwargs}: {error}") from None
    except RecursionError:  # a spec string nested (or aliased into itself) without end
        raise UsageError(f"--norm {str(args.norm)[:60]!r}...: the spec is nested too deeply (or refers to "
                         f"itself)") from None
    except (OSError, RuntimeError) as error:
        if not args.pretrained:
            raise
        # offline: huggingface_hub's LocalEntryNotFoundError (an OSError) after its retries; a model
        # without weights: timm's RuntimeError. Either way one line, not the hub's traceback.
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"--pretrained: the weights of {args.model} could not be loaded ({type(error).__name__}: "
                         f"{first_line}); timm fetches them from the Hugging Face hub: go online, fill the hub "
                         f"cache (HF_HOME) beforehand, or give the file with --initial-checkpoint PATH") from None
    set_norm_hyperparameters(model, args.bn_momentum, args.bn_eps)  # (a ValueError: bad input, as any in set-up)
    if args.initial_checkpoint:
        load_initial_checkpoint(model, args.initial_checkpoint, args.model)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model, args.model)
    return model.to(info.device)


def load_initial_checkpoint(model: nn.Module, path: str, name: str) -> None:
    """``--initial-checkpoint``: timm's ``load_checkpoint`` (EMA weights when present, as timm's train.py)."""
    if not Path(path).is_file():
        raise UsageError(f"--initial-checkpoint {path!r}: no such file")
    try:
        timm_load_checkpoint(model, path, use_ema=True)
    except RuntimeError as error:  # missing/unexpected keys or shape mismatches, listed by torch
        first_lines = " ".join(str(error).splitlines()[:3])[:400]
        raise UsageError(f"--initial-checkpoint {path!r} does not fit --model {name} "
                         f"with this --norm: {first_lines}") from None


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """``--grad-checkpointing`` through timm's ``set_grad_checkpointing``, refused where it would be wrong.

    Checkpointing runs each block's forward again during backward. torch replays its own random
    streams for that, but not the noise layers' dedicated generator (see
    :func:`shared.specs.attach_noise_generator`): the recomputed block would draw different noise than
    the one whose loss is being differentiated, so noise specs are refused.
    """
    # noise layers are the modules with a ``generator`` slot (the ones attach_noise_generator fills)
    noisy = [type(m).__name__ for m in model.modules()
             if hasattr(m, "generator") and not isinstance(m.generator, nn.Module)]
    if noisy:
        raise UsageError(f"--grad-checkpointing cannot be used with noise layers ({noisy[0]} and "
                         f"{len(noisy) - 1} more): recomputing a block would draw different noise")
    if not hasattr(model, "set_grad_checkpointing"):
        raise UsageError(f"--grad-checkpointing: --model {name} has no set_grad_checkpointing (not a timm model?)")
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError) as error:
        raise UsageError(f"--grad-checkpointing: --model {name} does not support it "
                         f"({error or 'no reason given'})") from None


def check_ghost_batches(model: nn.Module, batch_size: int) -> None:
    """Reject ghost batch sizes N that cannot work with the per-process batch size B.

    Ghost batch norms (GBN, XBN, EvalNorm) need N <= B: a larger one would silently normalize over the
    whole batch. Ghost noise layers (GNI, NoisyAffine) draw their ghost batches with replacement, so
    N > B is fine, but each call holds a (B, N) int64 index tensor: B x N must stay within
    :data:`MAX_GHOST_INDICES`.
    """
    sized = [(name, module, module.ghost_batch_size) for name, module in model.named_modules()
             if isinstance(getattr(module, "ghost_batch_size", None), int)]  # (None: the whole batch)
    for name, module, size in sized:
        if batch_size * size > MAX_GHOST_INDICES:
            raise UsageError(f"ghost_batch_size {size} of {type(module).__name__} {name!r} needs a "
                             f"{batch_size} x {size} index tensor at --batch-size {batch_size} "
                             f"({batch_size * size * 8 / 2 ** 30:.1f} GiB); B x N must be at most "
                             f"{MAX_GHOST_INDICES} (N at most {MAX_GHOST_INDICES // batch_size} at this batch size)")
    too_big = [(name, module, size) for name, module, size in sized
               if isinstance(module, nodo.PartitionedBatchNorm) and size > batch_size]
    if too_big:
        name, module, size = too_big[0]
        raise UsageError(f"ghost_batch_size {size} of {type(module).__name__} {name!r} (and "
                         f"{len(too_big) - 1} more layers) is larger than the per-process batch size "
                         f"--batch-size {batch_size}: it must be at most {batch_size} (ghost noise layers, "
                         f"gni/nat, accept any size)")


def build_loss(args) -> tuple:
    """(training loss, mixup function or None): timm's losses, as timm's train.py chooses them."""
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.num_classes)
        return SoftTargetCrossEntropy(), mixup
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
    return nn.CrossEntropyLoss(), None


def first_nonfinite_site(model: nn.Module, images: torch.Tensor) -> str:
    """Name the first parameter, or else the first module output (in execution order), that is not finite."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            return f"parameter {name}"
    found: list = []

    def hook(module, _inputs, output):
        if not found and isinstance(output, torch.Tensor) and output.is_floating_point() \
                and not torch.isfinite(output).all():
            found.append(module_names.get(module, type(module).__name__))

    module_names = {module: name or "(model)" for name, module in model.named_modules()}
    handles = [module.register_forward_hook(hook) for module in model.modules()]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return f"output of {found[0]}" if found else "no parameter or module output (the loss itself)"


# ----------------------------------------------------------------------------------------------
# Set-up: run directory, resume decision, data, model; then the training run itself
# ----------------------------------------------------------------------------------------------

# (this file has no ``from __future__ import annotations``: a dataclass with string annotations needs its
# module in sys.modules, and tests load train.py by file path)
@dataclasses.dataclass
class Progress:
    """Where training stands: saved in every checkpoint, so that a resume continues bit-identically."""
    epoch: int = 0  # the next epoch to run
    batch: int = 0  # the next micro-batch of it
    num_updates: int = 0
    history: list = dataclasses.field(default_factory=list)  # the summary.csv rows (best_epoch ranks them)
    partial_loss: float = 0.0  # this process's loss sum over the micro-batches before `batch`
    wall_before: float = 0.0  # seconds trained by the runs this one continues


def open_run_dir(run_dir: Path, args, info, resume_path: Optional[Path]) -> run_files.RunLock:
    """Create and lock ``run_dir`` (process 0), then refuse it if it holds results this run may not touch.

    Results may be continued (resuming from its ``last.pth.tar``) or moved aside (``--start-fresh``),
    never overwritten. Every process learns whether process 0 refused.

    Raises:
        RunDirError: in use by another run, not writable, or holding results (the message says what to do).
    """
    lock, refusal = run_files.NO_LOCK, None
    if info.is_primary:
        try:
            lock = run_files.prepare_run_dir(run_dir)
            continues = resume_path is not None and resume_path.resolve() == (run_dir / "last.pth.tar").resolve()
            if not args.start_fresh and not continues:
                run_files.refuse_if_results(run_dir)
        except run_files.RunDirError as error:
            lock.release()
            refusal = error
    if distributed.any_process(refusal is not None, info):
        raise refusal or run_files.RunDirError(f"process 0 refused {run_dir} (see its message)")
    return lock


def open_checkpoint(args, args_dict: dict, info, run_dir: Path, cleanup: contextlib.ExitStack) -> tuple:
    """Lock the run directory (released by ``cleanup``) and read the checkpoint to resume from, if any.

    Returns ``(checkpoint or None, its path or None)``. Runs before any expensive work, so that a run
    directory in use or a resume with changed arguments (``args_dict`` against the checkpoint's) is
    refused at once.
    """
    last_path, resume_path = run_dir / "last.pth.tar", None
    if args.resume == "auto" and not args.start_fresh and last_path.is_file():
        resume_path = last_path
    elif args.resume and args.resume != "auto":
        resume_path = Path(args.resume)
        if not resume_path.is_file():
            raise UsageError(f"--resume {args.resume!r}: no such checkpoint file (use --resume auto to start "
                             f"fresh when none exists)")
    cleanup.callback(open_run_dir(run_dir, args, info, resume_path).release)
    checkpoint = load_checkpoint(resume_path) if resume_path is not None else None
    if args.start_fresh and info.is_primary:  # after loading: --resume may name a checkpoint in there
        aside = run_files.move_results_aside(run_dir)
        if aside is not None:
            log(info, f"--start-fresh: the earlier results of {run_dir} are now in {aside}")
    if checkpoint is not None:
        changes = run_files.changed_result_keys(checkpoint.get("args", {}), args_dict, config_module.parser_defaults())
        if changes and not args.resume_allow_changes:
            raise UsageError(f"refusing to resume {resume_path}: these result-changing arguments differ from the "
                             f"checkpoint's\n{run_files.format_changes(changes)}\npass the original values, "
                             f"or --resume-allow-changes to resume anyway")
    return checkpoint, resume_path


def build_model_and_data(args, info) -> tuple:
    """Seeds, loaders, the model with its noise generator, ready for the optimizer.

    Returns ``(loaders, model, noise_generator)``; sets ``args.num_classes``.
    """
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2 ** 32)
    random.seed(args.seed)
    loaders = data.create_loaders(args, info.device, info.rank, info.world_size)
    args.num_classes = loaders.config.num_classes
    model = build_model(args, args.num_classes, loaders.config.input_size[0], info)
    check_ghost_batches(model, args.batch_size)
    noise_seed = (args.noise_seed if args.noise_seed is not None else args.seed) + info.rank
    noise_generator = specs.attach_noise_generator(model, noise_seed, info.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.sync_bn and info.distributed:
        model = convert_sync_batchnorm(model)
    return loaders, model, noise_generator


def sync_norm_statistics(model: nn.Module, ema, mode: str, info) -> None:
    """``--dist-bn``: make every process's running statistics equal before an evaluation, as timm does.

    ``reduce``: each ``running_mean``/``running_var`` buffer becomes the mean over the W processes,
    ``(1/W) sum_r buffer_r``; ``broadcast``: rank 0's is copied to all. Applied to the model and to the
    EMA model (whose statistics are averaged from each process's own). No-op on one process or with ''.
    """
    if info.distributed and mode:
        for module in [model] + ([ema.module] if ema is not None else []):
            distribute_bn(module, info.world_size, reduce=mode == "reduce")


class Training:
    """One training run: :meth:`__init__` sets it up (where a ValueError is bad input), :meth:`run` trains
    epoch after epoch, checkpointing after each (:meth:`save`), and writes the results."""

    def __init__(self, args, info, cleanup: contextlib.ExitStack):
        self.args, self.info = args, info
        if not args.experiment:
            args.experiment = f"{datetime.now():%Y%m%d-%H%M%S}-{args.model}"
        self.run_dir = Path(args.output) / args.experiment
        self.last_path = self.run_dir / "last.pth.tar"
        self.args_dict = config_module.args_to_dict(args)  # as asked for: what a resume compares
        checkpoint, resume_path = open_checkpoint(args, self.args_dict, info, self.run_dir, cleanup)
        self.loaders, model, self.noise_generator = build_model_and_data(args, info)
        self.unwrapped = model  # what is saved, averaged by EMA and inspected
        global_batch = args.batch_size * args.grad_accum_steps * info.world_size
        if args.lr is None:
            scale = args.lr_base_scale or ("sqrt" if any(k in args.opt.lower() for k in ("ada", "lamb")) else "linear")
            ratio = global_batch / args.lr_base_size
            args.lr = args.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)
        self.optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
        updates_per_epoch = -(-len(self.loaders.train) // args.grad_accum_steps)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == "loss"),
            updates_per_epoch=updates_per_epoch)
        # BatchRenorm2d's warm-up is given in fractions of training: tell it the run's training forwards
        nodo.set_total_steps(model, self.num_epochs * len(self.loaders.train))
        self.loss_fn, self.mixup = build_loss(args)
        # disabled (each call a no-op) unless float16 AMP
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=args.amp and args.amp_dtype != "bfloat16")
        self.ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
            if args.model_ema else None
        site_report = getattr(model, "site_report", None)  # shared.specs.SiteReport: what the spec replaced
        # ghost batches are per process: the world size and per-process batch define what GBN/GNI did (kept
        # out of args_dict, whose keys a resume compares with the checkpoint's)
        self.run_facts = {"norm_sites": site_report.as_dict() if site_report is not None else None,
                          "world_size": info.world_size, "per_process_batch": args.batch_size}
        self.progress = self.restore(checkpoint, resume_path) if checkpoint is not None else Progress()
        self.model = compile_model(model, args.torchcompile) if args.torchcompile else model
        if info.distributed:  # (so: the model called is wrapped in DDP exactly when info.distributed)
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        self.noise_monitor = None
        if args.log_noise_every is not None and info.is_primary:  # rank 0 measures its own batch
            self.noise_monitor = NoiseMonitor(model, args.log_noise_every, self.run_dir / CSV_NAME,
                                              self.progress.num_updates)
            if not self.noise_monitor.sites:
                log(info, "WARNING: --log-noise-every: the model has no ghost noise or ghost batch norm site")
        self.logger = self.start_logging(global_batch, updates_per_epoch)
        self.started = time.time()

    def restore(self, checkpoint: dict, resume_path: Path) -> Progress:
        """Load a checkpoint's weights, optimizer, schedule, EMA and random state; return its progress."""
        args, info = self.args, self.info
        try:
            self.unwrapped.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as error:
            raise UsageError(f"checkpoint {resume_path} does not fit --model {args.model}: {error}") from None
        if args.no_resume_opt:  # timm's --no-resume-opt: weights, position and schedule only
            log(info, "--no-resume-opt: the optimizer and gradient scaler start afresh")
        else:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if self.scaler.is_enabled() and checkpoint.get("amp_scaler") is not None:
                self.scaler.load_state_dict(checkpoint["amp_scaler"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.ema is not None and checkpoint.get("state_dict_ema") is not None:
            self.ema.module.load_state_dict(checkpoint["state_dict_ema"])
        # rows of a previous-version checkpoint carry the old metric names (top1...), renamed here; its best
        # (ranked on the raw model even with EMA) is not read: best_epoch derives it from the history
        history = [run_files.timm_metric_names(row) for row in checkpoint["history"]]
        progress = Progress(epoch=checkpoint["epoch"], batch=checkpoint["batch"], num_updates=checkpoint["num_updates"],
                            history=history, wall_before=checkpoint.get("wall_time_s", 0.0))
        rng_states = checkpoint["rng"]
        if len(rng_states) == info.world_size:
            restore_rng_state(rng_states[info.rank], self.noise_generator)
            progress.partial_loss = checkpoint["partial_loss"][info.rank]
        else:
            log(info, f"WARNING: checkpoint has random state for {len(rng_states)} processes, this run has "
                      f"{info.world_size}: the random streams start afresh")
        log(info, f"resumed {resume_path}: epoch {progress.epoch}, step {progress.batch}, "
                  f"update {progress.num_updates}")
        return progress

    def start_logging(self, global_batch: int, updates_per_epoch: int):
        """Write args.yaml, start the wandb logger, print what is about to run; returns the logger."""
        args, info, model = self.args, self.info, self.unwrapped
        if info.is_primary:
            # the resolved values (num_classes, lr from --lr-base...), not only what was asked for
            run_files.write_run_file(self.run_dir / "args.yaml", config_module.yaml_text(args))
        resolved = config_module.args_to_dict(args)
        logger = WandbLogger(self.run_dir, args.experiment, {**resolved, **self.run_facts},
                             project=args.wandb_project, tags=args.wandb_tags,
                             display_name=args.wandb_name, enabled=args.log_wandb and info.is_primary,
                             derived=derived_config(model, info.world_size, args.batch_size, global_batch,
                                                    resolved, site_report=self.run_facts["norm_sites"]))
        log(info, f"run {self.run_dir} on {info.device} x {info.world_size}: {args.model} norm={args.norm!r}, "
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        if getattr(model, "site_report", None) is not None:
            log(info, str(model.site_report))
        log(info, f"data: {self.loaders.description}")
        log(info, f"schedule: {self.num_epochs} epochs x {updates_per_epoch} updates, global batch {global_batch}, "
                  f"lr {args.lr:g}")
        return logger

    def autocast(self):
        """The forward passes' autocast context (``--amp``; disabled otherwise)."""
        # (--amp-dtype's choices, float16 and bfloat16, are torch's dtype names)
        return torch.autocast(self.info.device.type, dtype=getattr(torch, self.args.amp_dtype), enabled=self.args.amp)

    # ---- the loop: updates, epochs, checkpoints

    def forward_backward(self, micro_batches, group_size: int) -> tuple:
        """The forward and backward passes of one update: gradients of each loss / ``group_size``, summed.

        Returns ``(the last micro-batch's images, the losses)``.
        """
        losses = []
        for index, (images, targets) in enumerate(micro_batches):
            if self.args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            # under DDP, gradients are synchronized only on the last micro-batch of an update
            sync = not self.info.distributed or index == group_size - 1
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast():
                loss = self.loss_fn(self.model(images), targets)
            self.scaler.scale(loss / group_size).backward()
            losses.append(loss.detach())
        return images, losses

    def check_update(self, losses: list) -> tuple:
        """``(finite, overflow)``: whether the update may be applied, and whether float16's scaler skips it.

        float16's scaler expects inf gradients now and then: an "overflow step", which it skips (and lowers
        its scale); counted, not a failure. A non-finite loss of any micro-batch of the update is a failure
        with or without it. Every process agrees (under DDP, gradients are the same on every rank).
        """
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # every gradient's norm in a few fused kernels (torch's foreach), then one device-to-host sync for all
        grad_norms = list(torch._foreach_norm(grads)) if grads else []  # (it refuses an empty list)
        is_finite = torch.isfinite(torch.stack(losses + grad_norms))  # (stack promotes bfloat16 to float32)
        not_finite = ~torch.stack([is_finite[:len(losses)].all(), is_finite[len(losses):].all()])
        # summed over the processes before the sync: under DDP the agreement costs no second sync
        bad_losses, bad_grads = distributed.all_reduce_sum(not_finite.float(), self.info).tolist()
        amp = self.scaler.is_enabled()
        finite = not bad_losses and (amp or not bad_grads)
        return finite, finite and amp and bool(bad_grads)

    def skip_update(self, buffers_before: list, where: str, images: torch.Tensor, losses: list) -> None:
        """A non-finite update: raise :class:`NonFiniteError` (``--nonfinite stop``), or undo what its
        forward passes did to the running statistics (``skip``)."""
        if self.args.nonfinite == "stop":
            # the first non-finite loss of the update's micro-batches (the last one when only a gradient was)
            loss = next((loss for loss in losses if not torch.isfinite(loss)), losses[-1])
            raise NonFiniteError(f"non-finite loss ({loss.item()}) or gradient at {where}; first non-finite "
                                 f"site: {first_nonfinite_site(self.unwrapped, images)}")
        with torch.no_grad():
            for buffer, saved in zip(self.unwrapped.buffers(), buffers_before):
                buffer.copy_(saved)

    def apply_update(self, finite: bool) -> None:
        """Clip, step (unless the update is skipped), zero the gradients, count, EMA, schedule."""
        if finite:
            if self.args.clip_grad is not None:  # (not for a skipped update: its gradients are thrown away)
                dispatch_clip_grad(self.model.parameters(), self.args.clip_grad, mode=self.args.clip_mode)
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.num_updates += 1
        if self.ema is not None:
            self.ema.update(self.unwrapped, step=self.progress.num_updates)
        self.scheduler.step_update(num_updates=self.progress.num_updates)

    def train_one_epoch(self, progress_bar: bool) -> dict:
        """Train epoch ``progress.epoch`` from micro-batch ``progress.batch`` to its end.

        ``progress.partial_loss`` is the loss sum of the batches before ``progress.batch`` (a resume inside
        an epoch), so the epoch's mean train loss is the same as without the interruption.
        Returns ``{'train_loss', 'lr', 'skipped', 'overflows'}``. Raises :class:`Preempted` after
        checkpointing when a stop signal arrives, :class:`NonFiniteError` on a NaN/inf loss under
        ``--nonfinite stop``.
        """
        args, info, progress, loader = self.args, self.info, self.progress, self.loaders.train
        epoch, accum, num_batches, monitor = progress.epoch, args.grad_accum_steps, len(loader), self.noise_monitor
        self.model.train()
        loader.set_epoch(epoch)
        total_loss = torch.tensor(progress.partial_loss, device=info.device)
        skipped = overflows = 0
        batches = loader.batches(progress.batch)
        bar = tqdm(total=num_batches, initial=progress.batch, desc=f"epoch {epoch}", unit="batch",
                   dynamic_ncols=True, disable=not progress_bar)
        last_log = time.time()
        # a resume starts at an update boundary: each group of micro-batches is one update
        groups = range(progress.batch, num_batches, accum)
        for group_start in groups:
            group_size = min(accum, num_batches - group_start)  # the last update of an epoch may be smaller
            end = group_start + group_size
            # a skipped update must also undo what its forward passes did to the running statistics
            buffers_before = [b.clone() for b in self.unwrapped.buffers()] if args.nonfinite == "skip" else []
            if monitor is not None and monitor.due(progress.num_updates + 1):
                monitor.arm()  # hooks for this update's first forward pass only (shared.noise_monitor)
            images, losses = self.forward_backward(itertools.islice(batches, group_size), group_size)
            total_loss = sum(losses, total_loss)
            bar.update(group_size)
            finite, overflow = self.check_update(losses)
            if not finite:
                where = f"epoch {epoch}, step {end} of {num_batches} (update {progress.num_updates + 1})"
                self.skip_update(buffers_before, where, images, losses)
                skipped += 1
                log(info, f"WARNING: non-finite loss or gradient at {where}: update skipped ({skipped} this epoch)")
            self.apply_update(finite)
            overflows += overflow
            if monitor is not None and monitor.armed:
                self.logger.log(monitor.collect(progress.num_updates, epoch), step=progress.num_updates)
            if (end // accum) % args.log_interval == 0 or end == num_batches:
                step_loss = losses[-1].item()
                lr = self.optimizer.param_groups[0]["lr"]
                self.logger.log({"train/loss": step_loss, "train/lr": lr, "epoch": epoch}, step=progress.num_updates)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.3g}")
                if not progress_bar and info.is_primary:
                    rate = args.log_interval * accum * args.batch_size / max(time.time() - last_log, 1e-9)
                    print(f"epoch {epoch} [{end:>5d}/{num_batches}] loss {step_loss:.4f} lr {lr:.4g} "
                          f"{rate:.0f} img/s", flush=True)
                last_log = time.time()
            if distributed.any_process(bool(_stop_signal), info) and end < num_batches:
                bar.close()
                progress.batch, progress.partial_loss = end, total_loss.item()
                self.save()
                raise Preempted(f"epoch {epoch}, step {end}")
        bar.close()
        if groups and skipped == len(groups):  # (the same on every process: `finite` is agreed on)
            raise NonFiniteError(f"all {len(groups)} updates of epoch {epoch} had a non-finite loss or gradient and "
                                 f"were skipped (--nonfinite skip): the model is not training")
        sums = distributed.all_reduce_sum(torch.stack([total_loss, total_loss.new_tensor(num_batches)]), info)
        return {"train_loss": (sums[0] / sums[1].clamp_min(1)).item(),
                "lr": self.optimizer.param_groups[0]["lr"], "skipped": skipped, "overflows": overflows}

    def epoch_row(self, epoch: int, train_metrics: dict, epoch_start: float) -> dict:
        """The epoch's summary.csv row: train loss, evaluation (of the EMA model too), lr, time, counters."""
        args, loader = self.args, self.loaders.eval
        evaluated = (epoch + 1) % args.eval_interval == 0 or epoch + 1 == self.num_epochs
        metrics = {"eval_loss": None, "eval_top1": None, "eval_top5": None}
        if evaluated:
            sync_norm_statistics(self.model, self.ema, args.dist_bn, self.info)
            metrics = evaluate(self.model, loader, self.info, self.autocast, args.channels_last)
        row = {"epoch": epoch, "train_loss": train_metrics["train_loss"], **metrics, "lr": train_metrics["lr"],
               "time": time.time() - epoch_start}
        if self.ema is not None and evaluated:
            ema_metrics = evaluate(self.ema.module, loader, self.info, self.autocast, args.channels_last)
            row.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        if train_metrics["skipped"]:
            row["skipped_updates"] = train_metrics["skipped"]
        if self.scaler.is_enabled():
            row["amp_overflow_steps"] = train_metrics["overflows"]
        return row

    def end_epoch(self, row: dict) -> None:
        """Record the epoch's row: schedule, checkpoint (and its hard links), summary.csv, results.json, logs."""
        args, progress, epoch = self.args, self.progress, row["epoch"]
        progress.history.append(row)
        # as timm: the EMA model's metric ranks checkpoints and steps a plateau schedule when EMA is on
        metric = row.get(ranking_column(args))
        self.scheduler.step(epoch + 1, metric)
        progress.epoch, progress.batch, progress.partial_loss = epoch + 1, 0, 0.0
        self.save(metric=metric)
        if self.info.is_primary:
            keep_extra_checkpoints(self.run_dir, self.last_path, epoch, progress.history, args)
            run_files.write_summary(self.run_dir, progress.history)
            run_files.write_results(self.run_dir, self.results("running"))
        # wandb keys as before (eval/top1, eval/top5, eval/eval_loss): dashboards keep working
        evaluation = {f"eval/{k.replace('eval_top', 'top')}": row[k] for k in ("eval_loss", "eval_top1", "eval_top5")
                      if row[k] is not None}
        self.logger.log(evaluation | {"epoch": epoch, "train/epoch_loss": row["train_loss"]},
                        step=progress.num_updates)
        text = (f"eval_loss {row['eval_loss']:.4f} top1 {row['eval_top1']:.2f} top5 {row['eval_top5']:.2f}"
                if row["eval_loss"] is not None else "not evaluated")
        log(self.info, f"epoch {epoch}: train_loss {row['train_loss']:.4f} {text} ({row['time']:.1f} s)")

    def save(self, metric: Optional[float] = None) -> None:
        """last.pth.tar at ``progress``: every process's random state and partial loss; process 0 writes."""
        progress = self.progress
        gathered = distributed.gather_objects((capture_rng_state(self.noise_generator), progress.partial_loss),
                                              self.info)
        if not self.info.is_primary:
            return
        save_checkpoint({
            # timm's keys (timm.models.load_checkpoint reads state_dict / state_dict_ema, arch, args)
            "state_dict": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "arch": self.args.model,
            "state_dict_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "metric": metric,
            # timm's NativeScaler key; its load_state_dict takes a GradScaler's state as it is
            "amp_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": progress.epoch, "batch": progress.batch, "num_updates": progress.num_updates,
            "history": progress.history, "best": best_epoch(progress.history, self.args),
            "rng": [rng for rng, _ in gathered], "partial_loss": [loss for _, loss in gathered],
            "args": self.args_dict, "wall_time_s": progress.wall_before + time.time() - self.started,
        }, self.last_path)

    def results(self, status: str, message: str = "") -> dict:
        """results.json: the status, the final and best epochs, counters and the run's facts."""
        history = self.progress.history
        return {"status": status, "epochs_done": len(history), "epochs": self.num_epochs,
                "final": history[-1] if history else None, "best": best_epoch(history, self.args),
                "wall_time_s": self.progress.wall_before + time.time() - self.started, "message": message,
                "num_updates": self.progress.num_updates, **self.run_facts,
                "amp_overflow_steps": sum(row.get("amp_overflow_steps", 0) for row in history)}

    def train_epochs(self) -> str:
        """The remaining epochs, each checkpointed; returns the status, ``finished`` or (``--stop-after``)
        ``preempted``. Raises :class:`Preempted` when a stop signal arrives."""
        args, info, progress, num_epochs = self.args, self.info, self.progress, self.num_epochs
        progress_bar = info.is_primary and sys.stderr.isatty()
        if progress.epoch >= num_epochs:
            log(info, f"nothing to do: {progress.epoch} of {num_epochs} epochs are done")
        while progress.epoch < num_epochs:
            epoch, epoch_start = progress.epoch, time.time()
            if self.mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                self.mixup.mixup_enabled = False
            train_metrics = self.train_one_epoch(progress_bar)
            self.end_epoch(self.epoch_row(epoch, train_metrics, epoch_start))
            if distributed.any_process(bool(_stop_signal), info) and epoch + 1 < num_epochs:
                raise Preempted(f"end of epoch {epoch}")
            if args.stop_after is not None and len(progress.history) >= args.stop_after and epoch + 1 < num_epochs:
                log(info, f"--stop-after {args.stop_after}: stopping after epoch {epoch}; continue with --resume auto")
                return "preempted"
        return "finished"

    def run(self) -> int:
        """Train until done or stopped, then write results.json and close the logger; returns the exit code."""
        info, last_path, history = self.info, self.last_path, self.progress.history
        for signum in STOP_SIGNALS:
            signal.signal(signum, _request_stop)
        if info.is_primary and history:
            # a kill between a checkpoint and the run files written after it leaves them an epoch behind: catch up
            if self.progress.batch == 0:  # last.pth.tar is that epoch's own checkpoint
                keep_extra_checkpoints(self.run_dir, last_path, history[-1]["epoch"], history, self.args)
            run_files.write_summary(self.run_dir, history)
        exit_code, failure = EXIT_OK, ""
        try:
            status = self.train_epochs()
        except Preempted as where:
            status, exit_code = (("interrupted", INTERRUPTED_EXIT_CODE) if signal.SIGINT in _stop_signal
                                 else ("preempted", PREEMPTED_EXIT_CODE))
            again = "requeue" if exit_code == PREEMPTED_EXIT_CODE else "continue"
            log(info, f"{status} at {where}: checkpoint written to {last_path}; {again} with --resume auto "
                      f"(exit {exit_code})")
        except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this moment, the last one stays
            status, exit_code = "interrupted", INTERRUPTED_EXIT_CODE
            print(f"\naborted by a second Ctrl-C: {kept_checkpoint(last_path)}", file=sys.stderr, flush=True)
        except NonFiniteError as error:
            status, exit_code, failure = "failed", EXIT_NONFINITE, str(error)
            print(f"error: {error}. {kept_checkpoint(last_path)}", file=sys.stderr, flush=True)
        except (CheckpointError, run_files.RunFileError) as error:
            status, exit_code, failure = "failed", EXIT_FAILED, str(error)
            print(f"error: {error}", file=sys.stderr, flush=True)
        if info.is_primary:
            try:
                run_files.write_results(self.run_dir, self.results(status, failure))
            except run_files.RunFileError as error:  # (a disk error may stop this small write too)
                if failure != str(error):
                    print(f"error: {error}", file=sys.stderr, flush=True)
                exit_code = EXIT_NONFINITE if exit_code == EXIT_NONFINITE else EXIT_FAILED
        if status == "finished":
            final, best = history[-1], best_epoch(history, self.args)
            self.logger.summary({"final/" + k: v for k, v in final.items()} | {"best/" + k: v for k, v in best.items()})
            log(info, f"done: final top1 {final['eval_top1']:.2f}, best {best['metric_name']} {best['metric']:.4g} "
                      f"(epoch {best['epoch']})")
        self.logger.finish(exit_code=0 if exit_code in (EXIT_OK, PREEMPTED_EXIT_CODE, INTERRUPTED_EXIT_CODE) else 1)
        return exit_code


# ----------------------------------------------------------------------------------------------
# Checkpoint files and the ranking of epochs
# ----------------------------------------------------------------------------------------------

def kept_checkpoint(last_path: Path) -> str:
    """What a stopped run leaves to continue from: promise a checkpoint only when one exists."""
    if last_path.is_file():
        return f"The last good checkpoint ({last_path}) is kept; continue with --resume auto."
    return "No checkpoint was written yet (it is written at the end of each epoch); the run must start over."


def ranking_column(args) -> str:
    """The summary column that ranks checkpoints: ``eval_top1``/``eval_top5``/``eval_loss``, ``ema_``-prefixed
    with EMA (timm ranks on the EMA model's metric when there is one)."""
    return ("ema_" if args.model_ema else "") + f"eval_{args.eval_metric}"


def rank_checkpoints(metrics: dict, decreasing: bool, size: int) -> list:
    """The epochs whose checkpoint-EPOCH files timm's CheckpointSaver would keep, best first.

    ``metrics`` maps epoch -> metric (None: not evaluated). Ranked epochs come first, best metric first
    (lowest when ``decreasing``), ties keep the earlier epoch; unranked ones follow, newest first, so an
    unranked checkpoint never displaces a ranked one. The first ``size`` are kept.
    """
    ranked = sorted((e for e, m in metrics.items() if m is not None),
                    key=lambda e: (metrics[e] if decreasing else -metrics[e], e))
    unranked = sorted((e for e, m in metrics.items() if m is None), reverse=True)
    return (ranked + unranked)[:size]


def best_epoch(history: list, args) -> Optional[dict]:
    """results.json's ``best``: the epoch ranked first by :func:`rank_checkpoints` (the earliest of equal
    ones), its ranking metric and every eval column of its summary row; None before any evaluation."""
    column = ranking_column(args)
    metrics = {row["epoch"]: row.get(column) for row in history}
    first = rank_checkpoints(metrics, args.eval_metric == "loss", 1)
    if not first or metrics[first[0]] is None:
        return None
    row = next(row for row in history if row["epoch"] == first[0])
    return {"epoch": row["epoch"], "metric": row[column], "metric_name": column,
            **{k: v for k, v in row.items() if k.startswith(("eval_", "ema_eval_"))}}


def keep_extra_checkpoints(run_dir: Path, last_path: Path, epoch: int, history: list, args) -> None:
    """model_best.pth.tar and checkpoint-EPOCH.pth.tar as hard links to ``epoch``'s last.pth.tar.

    (:func:`shared.run_files.atomic_link`: no copy, and each keeps the content it was made with.)
    model_best is made when ``epoch`` is the best (:func:`best_epoch`). The checkpoint-EPOCH files
    present and this epoch's are ranked (:func:`rank_checkpoints`): the ``--checkpoint-hist`` first
    are kept, the others removed, and this epoch's is made only if it is among them.
    """
    best = best_epoch(history, args)
    if best is not None and best["epoch"] == epoch:
        run_files.atomic_link(last_path, run_dir / "model_best.pth.tar")
    metrics = {row["epoch"]: row.get(ranking_column(args)) for row in history}
    matches = (re.fullmatch(r"checkpoint-(\d+)\.pth\.tar", path.name) for path in run_dir.iterdir())
    present = {int(match[1]): run_dir / match[0] for match in matches if match}  # {epoch: checkpoint-EPOCH file}
    candidates = {e: metrics.get(e) for e in set(present) | {epoch}}
    keep = rank_checkpoints(candidates, args.eval_metric == "loss", args.checkpoint_hist)
    if epoch in keep:
        run_files.atomic_link(last_path, run_dir / f"checkpoint-{epoch}.pth.tar")
    for number, path in present.items():
        if number not in keep:
            path.unlink(missing_ok=True)


def dry_loader(args, info) -> int:
    """``--dry-loader N``: N training batches through the data path alone (decode, augmentation, copy to the
    device, normalization), timed after the first (which waits for the workers to start); prints
    images/s per process. Training at about this rate means the loader is the bottleneck."""
    loaders = data.create_loaders(args, info.device, info.rank, info.world_size)
    log(info, f"data: {loaders.description}")
    batches = itertools.islice(every_epoch(loaders.train), args.dry_loader)
    next(batches)  # not timed: it waits for the workers to start
    synchronize(info.device)
    started = time.perf_counter()
    images = sum(batch.shape[0] for batch, _ in batches)
    synchronize(info.device)
    seconds = time.perf_counter() - started
    log(info, f"dry loader: {images} images in {seconds:.2f} s after the first batch: {images / seconds:.0f} img/s "
              f"per process ({args.workers} workers, batch {args.batch_size}, {loaders.train.kind} on {info.device})")
    return EXIT_OK


def every_epoch(loader):
    """The batches of epoch 0, 1, 2... of ``loader``, without end."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader.batches(0)


def compile_model(model: nn.Module, backend: str) -> nn.Module:
    """``torch.compile(model)``; with static shapes where dynamo cannot recompile the fused GNI
    layer with dynamic shapes (seen on torch 2.11: AssertionError in ``overwrite_tensor_vt_proxy``
    after the graph break at the layer's ``torch.Generator``). A layer's shapes are fixed in
    training, so static shapes only cost a recompile per shape there."""
    fused_gni = any(isinstance(module, nodo.GhostNoiseBatchNorm) for module in model.modules())
    if fused_gni and not fused_gni_compiles_dynamic():
        return torch.compile(model, backend=backend, dynamic=False)
    return torch.compile(model, backend=backend)


def fused_gni_compiles_dynamic() -> bool:
    """Capability probe: does dynamo compile a tiny fused GNI layer drawing from a
    ``torch.Generator``, with dynamic shapes, forward and backward? (It draws from its own
    generator: the global random stream is not touched.)"""
    generator = torch.Generator().manual_seed(0)
    layer = nodo.GhostNoiseBatchNorm2d(4, ghost_batch_size=2, generator=generator)
    probe = torch.rand(8, 4, 3, 3, generator=generator, requires_grad=True)
    try:
        torch.compile(layer, backend="eager", dynamic=True)(probe).sum().backward()
        return True
    except Exception:  # any failure of the probe: static shapes are the safe choice
        return False
    finally:
        torch.compiler.reset()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _stop_signal.clear()  # main() may be called more than once in one process (tests)
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    # from the start: a preemption signal during set-up must not kill the process (SIGUSR1's default);
    # it is acted on at the first update boundary (Ctrl-C during set-up stays a KeyboardInterrupt)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, _request_stop)
    try:
        with contextlib.ExitStack() as cleanup:  # releases the run directory's lock however the run ends
            try:
                args = config_module.parse_args(argv)
                check_args(args)
                info = distributed.init_distributed(args.device)
                if args.dry_loader:
                    return dry_loader(args, info)
                training = Training(args, info, cleanup)
            except (ValueError, CheckpointError) as error:  # bad input: flags, config, spec, data, checkpoint
                print(f"error: {error}", file=sys.stderr, flush=True)
                return EXIT_USAGE
            return training.run()  # past set-up a ValueError is a bug: it keeps its traceback
    except KeyboardInterrupt:  # Ctrl-C during set-up (no stop handler yet), or a second one after the loop
        print("\ninterrupted by Ctrl-C outside the training loop: nothing more was saved", file=sys.stderr,
              flush=True)
        return INTERRUPTED_EXIT_CODE
    finally:
        distributed.shutdown()
        for signum, handler in handlers.items():  # Training.run installed _request_stop; put back the caller's
            if handler is not None:
                signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
