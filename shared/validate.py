"""Evaluate a checkpoint on one split, with timm's ``validate.py`` flag names.

::

    python validate.py --checkpoint output/c10-rn20-gni16-s42/model_best.pth.tar --data-dir cifar10-jpeg --split test
    python -m shared.validate --checkpoint last.pth.tar --use-ema --dataset digits --split test

A checkpoint written by train.py carries its arguments: the model, ``--norm``, ``--model-kwargs``, the
number of classes and the data settings (dataset, input size, mean/std, crop) default to the training
run's (its ``--data-dir`` too), so usually only the split is needed. Flags given here win. Any other
checkpoint (timm's, a plain state dict) needs ``--model`` (and ``--norm`` if the model used one) and is
loaded with ``timm.models.load_checkpoint``.

Output, as timm's: one JSON object after ``--result`` (``top1``, ``top1_err``, ``top5``, ``top5_err``,
``loss``, ``param_count`` in millions, ``img_size``, ``crop_pct``, ``interpolation``, plus ``split``,
``samples``, ``checkpoint`` and ``use_ema``); ``--results-file`` also writes it as CSV or JSON. Accuracy
is ``100 * (samples whose label is the top-1 / among the top-5 logits) / samples``, the loss the mean
cross-entropy. Exit codes as train.py's: 0, 2 for bad input (flags, data, a checkpoint that is missing or
does not fit the model).
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import clean_state_dict, load_checkpoint as timm_load_checkpoint

from nodo import GhostNormBase
from shared import create_model, data, distributed, run_files
from shared.checkpoint import CheckpointError, with_timm_keys
from shared.config import EXIT_OK, EXIT_USAGE, ParseKwargs, parser_defaults, read_spec_text

# train.py arguments a checkpoint's "args" supplies when the command line does not set them.
FROM_CHECKPOINT = ("model", "norm", "model_kwargs", "num_classes", "dataset", "input_size", "img_size", "mean",
                   "std", "crop_pct", "interpolation", "channels_last")


@torch.no_grad()
def evaluate(model: nn.Module, loader, info, autocast=nullcontext, channels_last: bool = False) -> dict:
    """Mean cross-entropy and top-1/top-5 accuracy (%) over the whole split, summed over processes.

    Returns ``{'eval_loss', 'eval_top1', 'eval_top5'}`` (timm's summary names). ``loader`` yields
    ``(images, targets)`` on ``info.device`` (train.py's loader interface).
    """
    model.eval()
    totals = torch.zeros(4, device=info.device, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, count
    loader.set_epoch(0)
    for images, targets in loader.batches(0):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = model(images).float()
        # (B, k): the label is the j-th largest logit
        hits = output.topk(min(5, output.shape[1]), dim=1).indices.eq(targets[:, None])
        totals += torch.stack([F.cross_entropy(output, targets, reduction="sum").double(),
                               hits[:, :1].sum().double(), hits.sum().double(),
                               totals.new_full((), targets.numel())])  # a fill on the device, no host copy
    totals = distributed.all_reduce_sum(totals, info)
    count = totals[3].clamp_min(1)
    return {"eval_loss": (totals[0] / count).item(), "eval_top1": (100 * totals[1] / count).item(),
            "eval_top5": (100 * totals[2] / count).item()}


def create_parser() -> argparse.ArgumentParser:
    """timm validate.py's flag names (the subset that applies here) plus ``--norm``/``--model-kwargs``."""
    parser = argparse.ArgumentParser(prog="validate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", nargs="?", default=None, metavar="DIR", help="dataset root (as --data-dir)")
    parser.add_argument("--data-dir", default=None, metavar="DIR", help="dataset root")
    parser.add_argument("--dataset", default=None, metavar="NAME", help="as train.py (None: the checkpoint's)")
    parser.add_argument("--split", default="validation", metavar="SPLIT", help="split to evaluate (train.py syntax)")
    parser.add_argument("--dataset-download", action="store_true", default=False, help="allow torchvision downloads")
    parser.add_argument("--model", "-m", default=None, metavar="MODEL", help="timm model (None: the checkpoint's)")
    parser.add_argument("--norm", default=None, type=read_spec_text, metavar="SPEC",
                        help="norm spec (None: the checkpoint's)")
    parser.add_argument("--model-kwargs", nargs="*", default=None, action=ParseKwargs, metavar="KEY=VALUE",
                        help="model keyword arguments (None: the checkpoint's)")
    parser.add_argument("--checkpoint", default="", metavar="PATH", help="weights to evaluate")
    parser.add_argument("--use-ema", action="store_true", default=False, help="evaluate the checkpoint's EMA weights")
    parser.add_argument("--pretrained", action="store_true", default=False, help="timm's pretrained weights")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N", help="(None: the checkpoint's or data's)")
    parser.add_argument("--img-size", type=int, default=None, metavar="N", help="image size H = W")
    parser.add_argument("--input-size", default=None, nargs=3, type=int, metavar="N", help="C H W")
    parser.add_argument("--crop-pct", default=None, type=float, metavar="PCT", help="center-crop fraction")
    parser.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="normalization mean")
    parser.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="normalization std")
    parser.add_argument("--interpolation", default=None, metavar="NAME", help="resize interpolation")
    parser.add_argument("-b", "--batch-size", type=int, default=256, metavar="N", help="batch size")
    parser.add_argument("-j", "--workers", type=int, default=4, metavar="N", help="DataLoader workers")
    parser.add_argument("--pin-mem", action="store_true", default=False, help="pin DataLoader memory")
    parser.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory layout")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (None: cuda if available)")
    parser.add_argument("--amp", action="store_true", default=False, help="autocast")
    parser.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"), help="autocast dtype")
    parser.add_argument("--results-file", default="", metavar="PATH", help="also write the result here")
    parser.add_argument("--results-format", default="csv", choices=("csv", "json"), help="results file format")
    return parser


def set_norm_hyperparameters(model: nn.Module, momentum: Optional[float], eps: Optional[float]) -> int:
    """``--bn-momentum``/``--bn-eps`` on every BatchNorm-like layer; returns how many layers were set.

    BatchNorm-like: torch's ``_NormBase`` (BatchNorm1d/2d/3d, SyncBatchNorm, nodo's fused
    GhostNoiseBatchNorm2d) and nodo's ghost norms (GBN, XBN, EvalNorm), which keep running statistics
    updated as ``r <- (1 - momentum) r + momentum * batch statistic`` and normalize with
    ``(x - mean) / sqrt(var + eps)``. InstanceNorm (also a ``_NormBase``), LayerNorm and GroupNorm are
    not BatchNorm-like and keep their values, as in timm, whose flags reach only BatchNorm layers.
    (Here rather than in train.py: the evaluation of a checkpoint must rebuild the same layers.)

    Raises:
        ValueError: a value is given but the model has no BatchNorm-like layer.
    """
    if momentum is None and eps is None:
        return 0
    batch_norm_like = (nn.modules.batchnorm._NormBase, GhostNormBase)
    layers = [module for module in model.modules()
              if isinstance(module, batch_norm_like) and not isinstance(module, nn.modules.instancenorm._InstanceNorm)]
    if not layers:
        raise ValueError("--bn-momentum/--bn-eps: the model has no BatchNorm-like layer to apply them to")
    for layer in layers:
        if momentum is not None:
            layer.momentum = momentum
        if eps is not None:
            layer.eps = eps
    return len(layers)


def _read_checkpoint(path: str):
    """The checkpoint's content with timm's keys (a training checkpoint of any version), or a state dict."""
    if not Path(path).is_file():
        raise CheckpointError(f"--checkpoint {path!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"--checkpoint {path!r} cannot be read: {type(error).__name__}: {error}") from None
    return with_timm_keys(state) if isinstance(state, dict) else state


def resolve_args(options: argparse.Namespace, checkpoint) -> argparse.Namespace:
    """train.py-style arguments: train.py's defaults < the checkpoint's training arguments < these flags."""
    values = parser_defaults()
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(saved, dict):
        values.update({key: saved[key] for key in (*FROM_CHECKPOINT, "bn_eps") if key in saved})
    given = {key: value for key, value in vars(options).items() if value is not None}
    values.update({key: given[key] for key in FROM_CHECKPOINT if key in given})
    # the data location defaults to the training run's (the same machine, usually)
    values.update(data_dir=options.data_dir or options.data or (saved or {}).get("data_dir"),
                  dataset_download=options.dataset_download,
                  train_split=options.split, val_split=options.split, validation_batch_size=options.batch_size,
                  workers=options.workers, pin_mem=options.pin_mem, pretrained=options.pretrained)
    if "input_size" in given or "img_size" in given:  # a size given here replaces the checkpoint's
        values.update(input_size=given.get("input_size"), img_size=given.get("img_size"))
    return argparse.Namespace(**values)


def load_weights(model: nn.Module, checkpoint, path: str, use_ema: bool) -> None:
    """The checkpoint's (EMA) weights into ``model``; any non-train.py checkpoint through timm's loader."""
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        weights = checkpoint.get("state_dict_ema") if use_ema else checkpoint["state_dict"]
        if weights is None:
            raise ValueError(f"--use-ema: {path} holds no EMA weights (trained without --model-ema)")
        model.load_state_dict(clean_state_dict(weights))
    else:
        timm_load_checkpoint(model, path, use_ema=use_ema)


def validate(options: argparse.Namespace) -> dict:
    """Build the model and the split's loader, load the weights, evaluate; returns timm's result fields."""
    checkpoint = _read_checkpoint(options.checkpoint) if options.checkpoint else None
    args = resolve_args(options, checkpoint)
    if not args.model or (checkpoint is None and not args.pretrained):
        raise ValueError("give --checkpoint (a train.py checkpoint names its model) or --model with --pretrained")
    device = distributed.init_distributed(options.device).device
    info = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    loader, config = data.create_eval_loader(args, device)
    kwargs = dict(args.model_kwargs or {}, num_classes=config.num_classes)
    if config.input_size[0] != 3:
        kwargs.setdefault("in_chans", config.input_size[0])
    model = create_model(args.model, norm=args.norm, pretrained=args.pretrained, **kwargs)
    set_norm_hyperparameters(model, None, args.bn_eps)
    if checkpoint is not None:
        try:
            load_weights(model, checkpoint, options.checkpoint, options.use_ema)
        except RuntimeError as error:  # torch lists missing/unexpected keys and shape mismatches
            raise ValueError(f"--checkpoint {options.checkpoint} does not fit --model {args.model} --norm "
                             f"{args.norm!r}: {' '.join(str(error).splitlines()[:3])[:400]}") from None
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    def autocast():  # as train.py's: disabled without --amp
        return torch.autocast(device.type, dtype=getattr(torch, options.amp_dtype), enabled=options.amp)

    metrics = evaluate(model, loader, info, autocast, bool(args.channels_last))
    top1, top5, loss = metrics["eval_top1"], metrics["eval_top5"], metrics["eval_loss"]
    return {"model": args.model, "top1": round(top1, 4), "top1_err": round(100 - top1, 4), "top5": round(top5, 4),
            "top5_err": round(100 - top5, 4), "loss": round(loss, 6),
            "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "img_size": config.input_size[-1], "crop_pct": config.crop_pct, "interpolation": config.interpolation,
            "split": options.split, "samples": loader.num_samples, "checkpoint": options.checkpoint,
            "use_ema": options.use_ema}


def main(argv: Optional[Sequence[str]] = None) -> int:
    options = create_parser().parse_args(argv)
    try:
        result = validate(options)
        if options.results_file:  # one CSV row under its header, or the JSON object
            text = (json.dumps(result, indent=1) + "\n" if options.results_format == "json"
                    else run_files.csv_text(list(result), [list(result.values())]))
            run_files.atomic_write_text(Path(options.results_file), text)
    except (ValueError, CheckpointError, OSError) as error:  # DataError, SpecError, ConfigError are ValueErrors
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    print(f"--result\n{json.dumps(result, indent=4)}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
