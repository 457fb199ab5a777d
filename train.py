#!/usr/bin/env python3
"""Train a timm model with a norm/noise spec: the ghost-noise training harness.

    python train.py -c configs/c100_rn18/test_all.yaml --seed 43
    python train.py --dataset digits --model cifar_resnet20 --norm gni16 -b 64 --lr 0.1 --epochs 10
    torchrun --nproc_per_node 4 train.py -c CONFIG --resume auto

Flags keep timm's train.py names (``python train.py --help``); configuration is parsed in
:mod:`shared.config` (defaults < YAML config < command line). The run writes ``OUTPUT/EXPERIMENT/``:
``args.yaml``, ``summary.csv``, ``results.json``, ``last.pth.tar``, ``model_best.pth.tar``,
``checkpoint-EPOCH.pth.tar`` and, with ``--log-wandb``, ``wandb/``.

Read top to bottom: ``main`` parses and checks everything that can be checked before training, builds
the data, model, optimizer and schedule from timm's factories, restores a checkpoint if resuming, and
runs :func:`train_one_epoch` / :func:`evaluate` per epoch, checkpointing after each. Exit codes:
0 done, 1 crash, 2 bad input, 3 non-finite loss, 75 preempted (checkpointed; requeue with
``--resume auto``).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared import config as config_module
from shared import distributed, run_files
from shared.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from shared.config import EXIT_FAILED, EXIT_NONFINITE, EXIT_OK, EXIT_USAGE, PREEMPTED_EXIT_CODE, ConfigError


class UsageError(ValueError):
    """Bad input found by train.py itself (the modules it calls raise their own ValueError kinds)."""


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/inf."""


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; a checkpoint was written at a step boundary."""


# ----------------------------------------------------------------------------------------------
# Signals: SLURM sends SIGTERM (or SIGUSR1 with --signal) before it preempts a job.
# ----------------------------------------------------------------------------------------------

_stop_signal: list = []
_training_started = False  # set once set-up is done: errors after it are not "bad input"


def _request_stop(signum, _frame) -> None:
    _stop_signal.append(signum)
    print(f"\nreceived {signal.Signals(signum).name}: checkpointing at the next step boundary", file=sys.stderr, flush=True)


def log(info, *parts) -> None:
    if info.is_primary:
        print(*parts, flush=True)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def check_args(args) -> None:
    """Reject values that cannot train before any work is done."""
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    for name in ("batch_size", "epochs", "grad_accum_steps", "log_interval", "eval_interval"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.validation_batch_size is not None and args.validation_batch_size < 1:
        raise UsageError(f"--validation-batch-size must be a positive integer, got {args.validation_batch_size}")
    if args.checkpoint_hist < 0:
        raise UsageError(f"--checkpoint-hist must be >= 0, got {args.checkpoint_hist}")
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after must be a positive number of epochs, got {args.stop_after}")
    if not 0.0 <= args.smoothing < 1.0:
        raise UsageError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if args.resume == "auto" and not args.experiment:
        raise UsageError("--resume auto needs a fixed --experiment name (the run directory to continue)")


def build_model(args, num_classes: int, in_chans: int, info) -> nn.Module:
    import timm

    from shared import create_model

    kwargs = dict(args.model_kwargs)
    kwargs.setdefault("num_classes", num_classes)
    if in_chans != 3:
        kwargs.setdefault("in_chans", in_chans)
    if args.drop:
        kwargs.setdefault("drop_rate", args.drop)
    if args.drop_path is not None:
        kwargs.setdefault("drop_path_rate", args.drop_path)
    base_name = args.model.split(".", 1)[0]
    if not timm.is_model(base_name):
        import difflib

        close = difflib.get_close_matches(base_name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models()` lists them"
        raise UsageError(f"--model {args.model!r} is not a timm model{hint}")
    try:
        model = create_model(args.model, norm=args.norm, pretrained=args.pretrained, **kwargs)
    except TypeError as error:  # an unknown model keyword, named by Python in the message
        raise UsageError(f"--model {args.model} with --model-kwargs {args.model_kwargs}: {error}") from None
    return model.to(info.device)


def check_ghost_batches(model: nn.Module, batch_size: int) -> None:
    """Reject ghost batch norms (GBN, XBN, EvalNorm) whose ghost batch exceeds the per-process batch.

    Such a layer would silently normalize over the whole batch (plain or exclusive batch norm). Ghost
    noise layers (GNI, NoisyAffine) draw their ghost batches with replacement, so they take any size.
    """
    from nodo.ghost_batch_norm import _GhostNormBase

    too_big = [(name, module.ghost_batch_size) for name, module in model.named_modules()
               if isinstance(module, _GhostNormBase) and module.ghost_batch_size is not None
               and module.ghost_batch_size > batch_size]
    if too_big:
        name, size = too_big[0]
        raise UsageError(f"ghost_batch_size {size} of {type(model.get_submodule(name)).__name__} {name!r} (and "
                         f"{len(too_big) - 1} more layers) is larger than the per-process batch size "
                         f"--batch-size {batch_size}: it must be at most {batch_size} (ghost noise layers, "
                         f"gni/nat, accept any size)")


def build_loss(args) -> tuple:
    """(training loss, mixup function or None): timm's losses, as timm's train.py chooses them."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

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
# One epoch of training, one evaluation
# ----------------------------------------------------------------------------------------------

def train_one_epoch(epoch: int, start_batch: int, state: dict, args, info, progress_bar: bool) -> dict:
    """Train from micro-batch ``start_batch`` of ``epoch`` to the end of the epoch.

    ``state`` holds model, optimizer, scheduler, loaders... and ``num_updates`` (updated in place);
    ``state['partial_loss']`` is the loss sum of the batches before ``start_batch`` (a resume inside an
    epoch), so the epoch's mean train loss is the same as without the interruption.
    Returns ``{'train_loss', 'lr', 'skipped'}``. Raises :class:`Preempted` after checkpointing when a
    stop signal arrives, :class:`NonFiniteError` on a NaN/inf loss under ``--nonfinite stop``.
    """
    model, optimizer, scheduler, loader = state["model"], state["optimizer"], state["scheduler"], state["train_loader"]
    loss_fn, mixup, scaler, ema = state["loss_fn"], state["mixup"], state["scaler"], state["ema"]
    accum = args.grad_accum_steps
    num_batches = len(loader)
    model.train()
    loader.set_epoch(epoch)
    total_loss = torch.tensor(state.pop("partial_loss", 0.0), device=info.device)
    counted, skipped = 0, 0
    batches = loader.batches(start_batch)
    bar = None
    if progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=num_batches, initial=start_batch, desc=f"epoch {epoch}", unit="batch", dynamic_ncols=True)
    last_log = time.time()
    for position, (images, targets) in enumerate(batches, start=start_batch):
        group_start = position - position % accum
        group_size = min(accum, num_batches - group_start)  # the last update of an epoch may be smaller
        last_of_group = position == group_start + group_size - 1
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        if args.nonfinite == "skip" and position == group_start:
            # a skipped update must also undo what its forward passes did to the running statistics
            buffers_before = [buffer.clone() for buffer in state["unwrapped"].buffers()]
        # under DDP, gradients are synchronized only on the last micro-batch of an update
        sync = state["ddp"] is None or last_of_group
        monitor = state.get("noise_monitor")
        if monitor is not None and position == group_start and monitor.due(state["num_updates"] + 1):
            monitor.arm()  # hooks for this forward pass only (shared.noise_monitor)
        with (nullcontext() if sync else state["ddp"].no_sync()), state["autocast"]():
            output = model(images)
            loss = loss_fn(output, targets)
        scaled = loss / group_size
        if scaler is not None:
            scaler.scale(scaled).backward()
        else:
            scaled.backward()
        total_loss += loss.detach()
        if bar is not None:
            bar.update(1)
        if not last_of_group:
            continue

        # an update: check, clip, step, schedule, EMA
        if scaler is not None:
            scaler.unscale_(optimizer)
        # one device-to-host sync per update for the loss and every gradient: their norms, stacked.
        # float16's scaler expects inf gradients now and then (it skips the step and lowers its scale).
        checks = [loss.detach().float().reshape(1)]
        if scaler is None:
            checks += [torch.linalg.vector_norm(p.grad).float().reshape(1)
                       for p in model.parameters() if p.grad is not None]
        locally_finite = bool(torch.isfinite(torch.cat(checks)).all())
        finite = not distributed.any_process(not locally_finite, info)
        if not finite:
            where = f"epoch {epoch}, step {position + 1} of {num_batches} (update {state['num_updates'] + 1})"
            if args.nonfinite == "stop":
                raise NonFiniteError(f"non-finite loss ({loss.item()}) or gradient at {where}; first non-finite "
                                     f"site: {first_nonfinite_site(state['unwrapped'], images)}")
            skipped += 1
            with torch.no_grad():  # (a resume always starts at an update boundary: the snapshot exists)
                for buffer, saved in zip(state["unwrapped"].buffers(), buffers_before):
                    buffer.copy_(saved)
            log(info, f"WARNING: non-finite loss or gradient at {where}: update skipped ({skipped} this epoch)")
        if args.clip_grad is not None:
            from timm.utils import dispatch_clip_grad

            dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
        if finite:
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
        if scaler is not None:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state["num_updates"] += 1
        if ema is not None:
            ema.update(state["unwrapped"], step=state["num_updates"])
        scheduler.step_update(num_updates=state["num_updates"])
        counted += group_size
        lr = optimizer.param_groups[0]["lr"]
        if monitor is not None and monitor.armed:
            state["logger"].log(monitor.collect(state["num_updates"], epoch), step=state["num_updates"])

        updates_done = (position + 1) // accum
        if updates_done % args.log_interval == 0 or position + 1 == num_batches:
            step_loss = loss.item()
            state["logger"].log({"train/loss": step_loss, "train/lr": lr, "epoch": epoch}, step=state["num_updates"])
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.3g}")
            elif info.is_primary:
                rate = args.log_interval * accum * args.batch_size / max(time.time() - last_log, 1e-9)
                print(f"epoch {epoch} [{position + 1:>5d}/{num_batches}] loss {step_loss:.4f} lr {lr:.4g} "
                      f"{rate:.0f} img/s", flush=True)
            last_log = time.time()

        if distributed.any_process(bool(_stop_signal), info) and position + 1 < num_batches:
            if bar is not None:
                bar.close()
            state["save"](epoch, position + 1, partial_loss=total_loss.item())
            raise Preempted(f"epoch {epoch}, step {position + 1}")
    if bar is not None:
        bar.close()
    train_loss = distributed.all_reduce_sum(torch.stack([total_loss, torch.tensor(float(num_batches),
                                                                                    device=info.device)]), info)
    return {"train_loss": (train_loss[0] / train_loss[1].clamp_min(1)).item(),
            "lr": optimizer.param_groups[0]["lr"], "skipped": skipped}


@torch.no_grad()
def evaluate(model: nn.Module, loader, args, info, autocast) -> dict:
    """Loss, top-1 and top-5 accuracy (%) over the whole evaluation split, summed over processes."""
    model.eval()
    totals = torch.zeros(4, device=info.device, dtype=torch.float64)  # loss sum, top1, top5, count
    loader.set_epoch(0)
    for images, targets in loader.batches(0):
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = model(images)
        output = output.float()
        topk = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = topk.eq(targets[:, None])
        totals += torch.stack([F.cross_entropy(output, targets, reduction="sum").double(),
                               hits[:, :1].sum().double(), hits.sum().double(),
                               torch.tensor(float(targets.numel()), device=info.device, dtype=torch.float64)])
    totals = distributed.all_reduce_sum(totals, info)
    count = totals[3].clamp_min(1)
    return {"eval_loss": (totals[0] / count).item(), "top1": (100 * totals[1] / count).item(),
            "top5": (100 * totals[2] / count).item()}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    global _training_started
    _training_started = False  # main() may be called more than once in one process (tests)
    _stop_signal.clear()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        args = config_module.parse_args(argv)
        check_args(args)
    except (ConfigError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    info = distributed.init_distributed(args.device)
    try:
        return run(args, info)
    except (ValueError, CheckpointError) as error:
        if _training_started:  # past set-up a ValueError is a bug: keep its traceback
            raise
        # bad input found while setting up: config, spec, data, checkpoint
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        distributed.shutdown()
        for signum, handler in handlers.items():  # run() installed _request_stop; put back the caller's
            if handler is not None:
                signal.signal(signum, handler)


def run(args, info) -> int:
    import timm.optim
    import timm.scheduler
    import timm.utils

    from shared import data, specs

    # ---- run directory and resume decision (before any expensive work)
    if not args.experiment:
        args.experiment = f"{datetime.now():%Y%m%d-%H%M%S}-{args.model}"
    run_dir = Path(args.output) / args.experiment
    last_path = run_dir / "last.pth.tar"
    resume_path = None
    if args.resume == "auto":
        resume_path = last_path if last_path.is_file() else None
    elif args.resume:
        resume_path = Path(args.resume)
        if not resume_path.is_file():
            raise UsageError(f"--resume {args.resume!r}: no such checkpoint file (use --resume auto to start "
                             f"fresh when none exists)")
    elif last_path.is_file():
        raise UsageError(f"{run_dir} already holds a run (last.pth.tar); continue it with --resume auto or "
                         f"choose another --experiment")
    if info.is_primary:
        run_files.prepare_run_dir(run_dir)
    checkpoint = load_checkpoint(resume_path) if resume_path is not None else None
    args_dict = config_module.args_to_dict(args)
    if checkpoint is not None:
        changes = run_files.changed_result_keys(checkpoint.get("args", {}), args_dict)
        if changes and not args.resume_allow_changes:
            raise UsageError(f"refusing to resume {resume_path}: these result-changing arguments differ from the "
                             f"checkpoint's\n{run_files.format_changes(changes)}\npass the original values, "
                             f"or --resume-allow-changes to resume anyway")

    # ---- seeds, data, model
    torch.manual_seed(args.seed)
    import numpy as np
    import random

    np.random.seed(args.seed % 2 ** 32)
    random.seed(args.seed)
    loaders = data.create_loaders(args, info.device, info.rank, info.world_size)
    num_classes = loaders.config.num_classes
    args.num_classes = num_classes
    model = build_model(args, num_classes, loaders.config.input_size[0], info)
    check_ghost_batches(model, args.batch_size)
    noise_seed = (args.noise_seed if args.noise_seed is not None else args.seed) + info.rank
    noise_generator = specs.attach_noise_generator(model, noise_seed, info.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    unwrapped = model

    # ---- optimizer, schedule, loss, AMP, EMA (timm's factories)
    global_batch = args.batch_size * args.grad_accum_steps * info.world_size
    if args.lr is None:
        scale = args.lr_base_scale or ("sqrt" if any(k in args.opt.lower() for k in ("ada", "lamb")) else "linear")
        ratio = global_batch / args.lr_base_size
        args.lr = args.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)
    optimizer = timm.optim.create_optimizer_v2(model, **timm.optim.optimizer_kwargs(cfg=args), **args.opt_kwargs)
    updates_per_epoch = -(-len(loaders.train) // args.grad_accum_steps)
    scheduler, num_epochs = timm.scheduler.create_scheduler_v2(
        optimizer, **timm.scheduler.scheduler_kwargs(args, decreasing_metric=args.eval_metric == "loss"),
        updates_per_epoch=updates_per_epoch)
    loss_fn, mixup = build_loss(args)
    amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16

    def autocast():
        return torch.autocast(info.device.type, dtype=amp_dtype) if args.amp else nullcontext()

    scaler = torch.amp.GradScaler(info.device.type) if args.amp and amp_dtype == torch.float16 else None
    ema = timm.utils.ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
        if args.model_ema else None

    # ---- resume state
    start_epoch, start_batch, num_updates, history, best, partial_loss = 0, 0, 0, [], None, 0.0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise UsageError(f"checkpoint {resume_path} does not fit --model {args.model}: {error}") from None
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if ema is not None and checkpoint.get("ema") is not None:
            ema.load_state_dict(checkpoint["ema"])
        if scaler is not None and checkpoint.get("scaler") is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, start_batch = checkpoint["epoch"], checkpoint["batch"]
        num_updates, history, best = checkpoint["num_updates"], checkpoint["history"], checkpoint["best"]
        rng_states = checkpoint["rng"]
        if len(rng_states) == info.world_size:
            restore_rng_state(rng_states[info.rank], noise_generator)
            partial_loss = checkpoint["partial_loss"][info.rank]
        else:
            log(info, f"WARNING: checkpoint has random state for {len(rng_states)} processes, this run has "
                      f"{info.world_size}: the random streams start afresh")
        log(info, f"resumed {resume_path}: epoch {start_epoch}, step {start_batch}, update {num_updates}")

    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    ddp = None
    if info.distributed:
        ddp = model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    # ---- logging
    from shared.logging_wandb import WandbLogger, derived_config

    noise_monitor = None
    if args.log_noise_every is not None:  # rank 0 measures its own batch (shared.noise_monitor)
        from shared.noise_monitor import CSV_NAME, NoiseMonitor

        if args.log_noise_every < 1:
            raise UsageError(f"--log-noise-every must be a positive number of updates, got {args.log_noise_every}")
        if args.torchcompile:
            raise UsageError("--log-noise-every cannot be used with --torchcompile (its hooks would recompile the model)")
        if info.is_primary:
            noise_monitor = NoiseMonitor(unwrapped, args.log_noise_every, run_dir / CSV_NAME, num_updates)
            if not noise_monitor.sites:
                log(info, "WARNING: --log-noise-every: the model has no ghost noise or ghost batch norm site")

    if info.is_primary:
        # the resolved values (num_classes, lr from --lr-base...), not only what was asked for
        run_files.atomic_write_text(run_dir / "args.yaml", config_module.yaml_text(args))
    logger = WandbLogger(run_dir, args.experiment, args_dict, project=args.wandb_project, tags=args.wandb_tags,
                         display_name=args.wandb_name, enabled=args.log_wandb and info.is_primary,
                         derived=derived_config(unwrapped, info.world_size, args.batch_size, global_batch,
                                                       args_dict))
    log(info, f"run {run_dir} on {info.device} x {info.world_size}: {args.model} norm={args.norm!r}, "
              f"{sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters")
    log(info, f"data: {loaders.description}")
    log(info, f"schedule: {num_epochs} epochs x {updates_per_epoch} updates, global batch {global_batch}, lr {args.lr:g}")

    started = time.time()
    wall_before = checkpoint.get("wall_time_s", 0.0) if checkpoint is not None else 0.0
    status = {"value": "running"}

    def results(final_status: str, message: str = "") -> dict:
        final = history[-1] if history else None
        return {"status": final_status, "epochs_done": len(history), "epochs": num_epochs, "final": final,
                "best": best, "wall_time_s": wall_before + time.time() - started, "message": message,
                "num_updates": state["num_updates"]}

    def save(epoch: int, batch: int, partial_loss: float = 0.0) -> None:
        """last.pth.tar at (epoch, next micro-batch): every rank's random state and partial loss, rank 0 writes."""
        rng = distributed.gather_objects((capture_rng_state(noise_generator), partial_loss), info)
        if not info.is_primary:
            return
        save_checkpoint({
            "model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "batch": batch, "num_updates": state["num_updates"], "history": history, "best": best,
            "rng": [r for r, _ in rng], "partial_loss": [loss for _, loss in rng], "args": args_dict, "wall_time_s": wall_before + time.time() - started,
        }, last_path)

    state = dict(model=model, unwrapped=unwrapped, optimizer=optimizer, scheduler=scheduler, train_loader=loaders.train,
                 loss_fn=loss_fn, mixup=mixup, scaler=scaler, ema=ema, ddp=ddp, autocast=autocast,
                 num_updates=num_updates, logger=logger, save=save, partial_loss=partial_loss,
                 noise_monitor=noise_monitor)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, _request_stop)
    global _training_started
    _training_started = True
    progress_bar = info.is_primary and sys.stderr.isatty()
    exit_code = EXIT_OK
    try:
        if start_epoch >= num_epochs:
            log(info, f"nothing to do: {start_epoch} of {num_epochs} epochs are done")
        for epoch in range(start_epoch, num_epochs):
            epoch_start = time.time()
            if mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                mixup.mixup_enabled = False
            train_metrics = train_one_epoch(epoch, start_batch if epoch == start_epoch else 0, state, args, info,
                                            progress_bar)
            evaluated = (epoch + 1) % args.eval_interval == 0 or epoch + 1 == num_epochs
            metrics = evaluate(model, loaders.eval, args, info, autocast) if evaluated else \
                {"eval_loss": None, "top1": None, "top5": None}
            row = {"epoch": epoch, "train_loss": train_metrics["train_loss"], **metrics, "lr": train_metrics["lr"],
                   "time": time.time() - epoch_start}
            if ema is not None and evaluated:
                row.update({f"ema_{k}": v for k, v in evaluate(ema.module, loaders.eval, args, info, autocast).items()})
            if train_metrics["skipped"]:
                row["skipped_updates"] = train_metrics["skipped"]
            history.append(row)
            metric = row["eval_loss" if args.eval_metric == "loss" else args.eval_metric]
            scheduler.step(epoch + 1, metric)
            improved = evaluated and (best is None or (
                metric < best["metric"] if args.eval_metric == "loss" else metric > best["metric"]))
            if improved:
                best = {"epoch": epoch, "metric": metric, "top1": row["top1"], "top5": row["top5"],
                        "eval_loss": row["eval_loss"]}
            save(epoch + 1, 0)
            if info.is_primary:
                keep_extra_checkpoints(run_dir, last_path, epoch, improved, args.checkpoint_hist)
                run_files.write_summary(run_dir, history)
                run_files.write_results(run_dir, results("running"))
            logger.log({f"eval/{k}": v for k, v in metrics.items() if v is not None} | {"epoch": epoch,
                        "train/epoch_loss": row["train_loss"]}, step=state["num_updates"])
            evaluation = (f"eval_loss {row['eval_loss']:.4f} top1 {row['top1']:.2f} top5 {row['top5']:.2f}"
                          if evaluated else "not evaluated")
            log(info, f"epoch {epoch}: train_loss {row['train_loss']:.4f} {evaluation} ({row['time']:.1f} s)")
            if _stop_signal and epoch + 1 < num_epochs:
                raise Preempted(f"end of epoch {epoch}")
            if args.stop_after is not None and len(history) >= args.stop_after and epoch + 1 < num_epochs:
                status["value"] = "preempted"
                log(info, f"--stop-after {args.stop_after}: stopping after epoch {epoch}; continue with --resume auto")
                break
        else:
            status["value"] = "finished"
    except Preempted as where:
        status["value"], exit_code = "preempted", PREEMPTED_EXIT_CODE
        log(info, f"preempted at {where}: checkpoint written to {last_path}; requeue with --resume auto "
                  f"(exit {PREEMPTED_EXIT_CODE})")
    except NonFiniteError as error:
        status["value"], exit_code = "failed", EXIT_NONFINITE
        print(f"error: {error}. The last good checkpoint ({last_path}) is kept.", file=sys.stderr, flush=True)
        if info.is_primary:
            run_files.write_results(run_dir, results("failed", str(error)))
    except CheckpointError as error:
        status["value"], exit_code = "failed", EXIT_FAILED
        print(f"error: {error}", file=sys.stderr, flush=True)
        if info.is_primary:
            try:
                run_files.write_results(run_dir, results("failed", str(error)))
            except OSError:  # the same disk problem may stop this small write too
                pass
    if info.is_primary and status["value"] != "failed":
        run_files.write_results(run_dir, results(status["value"]))
    if status["value"] == "finished":
        summary = {"final/" + k: v for k, v in (history[-1] if history else {}).items()}
        summary |= {"best/" + k: v for k, v in (best or {}).items()}
        logger.summary(summary)
        log(info, f"done: final top1 {history[-1]['top1']:.2f}, best top1 {best['top1']:.2f} (epoch {best['epoch']})")
    logger.finish(exit_code=0 if exit_code in (EXIT_OK, PREEMPTED_EXIT_CODE) else 1)
    return exit_code


def keep_extra_checkpoints(run_dir: Path, last_path: Path, epoch: int, improved: bool, history_size: int) -> None:
    """model_best.pth.tar and checkpoint-EPOCH.pth.tar as hard links to this epoch's last.pth.tar.

    A link costs no copy; the next epoch's atomic rename gives last.pth.tar a new file, so a link keeps
    the content it was made with. Only the ``history_size`` newest checkpoint-EPOCH files are kept.
    """
    def link(target: Path) -> None:
        temporary = target.with_name(target.name + ".tmp")
        temporary.unlink(missing_ok=True)
        try:
            os.link(last_path, temporary)
        except OSError:  # filesystems without hard links
            import shutil

            shutil.copyfile(last_path, temporary)
        os.replace(temporary, target)

    if improved:
        link(run_dir / "model_best.pth.tar")
    if history_size > 0:
        link(run_dir / f"checkpoint-{epoch}.pth.tar")
        numbered = sorted(run_dir.glob("checkpoint-*.pth.tar"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
        for old in numbered[:-history_size]:
            old.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
