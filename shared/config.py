"""train.py's command line and YAML configs: timm's flag names, strict keys, bases and ``{key}`` templates.

::

    python train.py -c configs/c100_rn18/test_all.yaml --seed 43 --norm gni16
    python train.py --dataset digits --model cifar_resnet20 --norm gni16 -b 128 --lr 0.1 --epochs 10

Flags. Every flag keeps the name, ``dest``, meaning and default of timm's ``train.py`` (``--model``,
``-b/--batch-size``, ``--lr``, ``--opt``, ``--sched``, ``--sched-on-updates``, ``--warmup-epochs``,
``--smoothing``, ``--amp``, ``--model-ema``, ``--checkpoint-hist``...), so timm launch commands port
unchanged. This project adds ``--norm SPEC`` (a norm/noise spec, see :mod:`shared.specs`),
``--noise-seed``, ``--fast-loader``, ``--wandb-name``, ``--resume auto``, ``--stop-after`` and
``--resume-allow-changes``.

Precedence. parser defaults < YAML config (its ``bases`` first, in order, then the file) < flags
given on the command line. The resolved arguments are written to ``OUTPUT/EXPERIMENT/args.yaml``.

YAML configs. Keys are argparse ``dest`` names (``batch_size``, ``weight_decay``); anything else is an
error naming the key and the closest valid ones. Values are checked against the flag's type
(``epochs: 2.5`` is an error, ``lr: 1`` is read as ``1.0``). Meta keys:

* ``bases: [relative/path.yaml, ...]`` (or one string): merged first, in order, recursively (paths
  relative to the file that names them); a cycle is an error. A later file replaces a key as a whole.
* ``sweep: {key: [values], ...}``: the grid of ``python -m shared.sweep``; ignored by train.py but
  checked here (a mapping from argument names or dotted paths into a mapping argument, or the reserved
  ``cases`` key, to lists).

Templates. Any string value (also inside lists and mappings) may hold ``{key}`` placeholders, formatted
with the fully resolved arguments once the command line has been applied: ``experiment:
c100-rn18-{norm}-s{seed}``, ``train_split: "train[:0.9]-{seed}"``. Item access
(``{model_kwargs[block_dropout][p]}``) and format specs (``{lr:g}``) work as in ``str.format``;
attribute access does not (configs never reach code), nor does a placeholder naming another
template. Brace text that is not a placeholder (a JSON or YAML spec such as ``{"subtype": "gbn2d"}``)
stays as it is.

Errors in user input raise :class:`ConfigError` (a ``ValueError``); train.py prints it and exits with
:data:`EXIT_USAGE`.
"""
from __future__ import annotations

import argparse
import ast
import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

# Exit codes of train.py (the README's "When things go wrong" lists them).
EXIT_OK = 0
EXIT_FAILED = 1          # an unexpected error (a bug, a crash inside torch: see the traceback), or a disk
                         # that cannot be written (the message says why: full, quota...)
EXIT_USAGE = 2           # bad input: config, flags, data directory...; also a run directory in use by
                         # another run or holding results (argparse's own convention)
EXIT_NONFINITE = 3       # the loss became NaN/inf: the last good checkpoint (if any) is kept
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed after SIGTERM/SIGUSR1; requeue with --resume auto
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C: checkpointed; --resume auto continues

# Config keys that are not train.py arguments, and the reserved sweep key of several-key cases.
BASES_KEY = "bases"
SWEEP_KEY = "sweep"
SWEEP_CASES_KEY = "cases"


class ConfigError(ValueError, argparse.ArgumentTypeError):
    """A config file, flag or value that cannot be used; the message names it and what is valid.

    Also an ``argparse.ArgumentTypeError``, so a flag's type that raises it (``--norm``'s
    :func:`read_spec_text`) is a usage error (exit 2) with this message, as a config file's value is.
    """


# ----------------------------------------------------------------------------------------------
# Argument types
# ----------------------------------------------------------------------------------------------

class ParseKwargs(argparse.Action):
    """``--model-kwargs a=1 b=relu c="{'p': 0.1}"`` -> ``{'a': 1, 'b': 'relu', 'c': {'p': 0.1}}``.

    As timm's ``ParseKwargs``, with an argparse error (not a traceback) for an item without ``=``.
    The flag replaces the whole mapping of a config file.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, text = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string} expects key=value items, got {item!r}")
            try:  # a Python literal, as timm reads it (literal_eval evaluates literals only, never code)
                kwargs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                kwargs[key] = text  # anything else is the text itself: b=relu
        setattr(namespace, self.dest, kwargs)


# Limits on YAML (config files, structured --norm specs): real configs and specs are a few hundred values
# nested a few levels. Without them a few hundred bytes of aliases expand to gigabytes once anything walks
# the result ("billion laughs"), and deep nesting ends in a RecursionError.
MAX_YAML_VALUES = 100_000
MAX_YAML_NESTING = 32


def _yaml_extent(node: yaml.Node, depth: int, extents: dict, where: str) -> tuple:
    """``(values, levels)`` of ``node`` with every alias expanded, computed once per node (aliases share
    nodes); raises :class:`ConfigError` past :data:`MAX_YAML_VALUES` / :data:`MAX_YAML_NESTING` or on a
    recursive alias."""
    line = f"line {node.start_mark.line + 1}"
    if id(node) in extents:
        if extents[id(node)] is None:
            raise ConfigError(f"{where}, {line}: a YAML alias refers to itself (recursive structure)")
        values, levels = extents[id(node)]
    else:
        extents[id(node)] = None
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else []
        if depth + 1 > MAX_YAML_NESTING:
            raise ConfigError(f"{where}, {line}: nested more than {MAX_YAML_NESTING} levels deep")
        sizes = [_yaml_extent(child, depth + 1, extents, where) for child in children]
        values = 1 + sum(size for size, _ in sizes)
        levels = 1 + max((height for _, height in sizes), default=0)
        extents[id(node)] = (values, levels)
    if depth + levels > MAX_YAML_NESTING:
        raise ConfigError(f"{where}, {line}: nested more than {MAX_YAML_NESTING} levels deep (through aliases)")
    if values > MAX_YAML_VALUES:
        raise ConfigError(f"{where}, {line}: expands to more than {MAX_YAML_VALUES} values through YAML aliases "
                          f"(&anchor / *alias); write the values out")
    return values, levels


def load_bounded_yaml(text: str, where: str) -> tuple:
    """``(node, value)`` of YAML ``text``, refused (:class:`ConfigError`) when it nests or expands too far.

    The document is composed once (aliases stay shared references, so composing costs the text's size),
    measured with every alias expanded, and only then built into Python values.

    Raises:
        yaml.YAMLError: a syntax error. ConfigError: the limits above, naming ``where`` and the line.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ConfigError(f"{where}: nested more than {MAX_YAML_NESTING} levels deep") from None
    if node is None:
        return None, None
    _yaml_extent(node, 0, {}, where)
    return node, yaml.SafeLoader("").construct_document(node)


def read_spec_text(spec: Any, where: str = "--norm") -> Any:
    """A norm spec with its structured text (``[...]`` / ``{...}``) read as YAML, within the limits.

    So ``--norm '[ln, gnir12]'`` and the YAML list ``norm: [ln, gnir12]`` resolve to the same value
    (the spec parser accepts both forms; the sweep tool checks that a flag reads back unchanged). The
    reference implementation's JSON with Python's ``True``/``False`` is valid YAML too. Anything else,
    and text that is not valid YAML (the spec parser reports what is wrong with it), is returned as is.

    Raises:
        ConfigError: the text nests or expands past the YAML limits (naming ``where``).
    """
    if not isinstance(spec, str) or spec.strip()[:1] not in "[{":
        return spec
    try:
        return load_bounded_yaml(spec.strip(), where)[1]
    except yaml.YAMLError:
        return spec


# ----------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------

def _switch(group, flag: str, help_text: str) -> None:
    """An off-by-default flag (``action='store_true'``) of an argument group: only a name and a help."""
    group.add_argument(flag, action="store_true", help=help_text)


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """The "Dataset" group of :func:`create_parser`: the dataset, its splits and the loader."""
    group = parser.add_argument_group("Dataset")
    group.add_argument("--data-dir", default=None, metavar="DIR",
                       help="dataset root (ImageFolder: holds train/ and val/ or test/; torch/*: download dir)")
    group.add_argument("--dataset", default="", metavar="NAME",
                       help="torch/cifar10, torch/cifar100, digits (embedded), imagefolder (or '' with --data-dir)")
    group.add_argument("--train-split", default="train", metavar="SPLIT",
                       help="train split; a seeded subset: 'train[:0.9]-SEED' (fractions) or 'train[:500]-SEED' "
                            "(counts); without -SEED a subset is drawn with the fixed seed 0 (printed)")
    group.add_argument("--val-split", default="validation", metavar="SPLIT",
                       help="evaluation split: validation/val/test (an ImageFolder's val/ or test/ folder), or a "
                            "subset such as 'train[0.9:]-SEED'")
    _switch(group, "--dataset-download", "allow torchvision datasets to download (never without this flag)")
    _switch(group, "--data-strict", "an image file neither loader can use as it is (empty, unreadable, another size at "
                                    "native size, a second link to one file) is an error naming it (default: left out, "
                                    "counted by cause in the data: line)")
    group.add_argument("--fast-loader", default="auto", choices=("auto", "on", "off"),
                       help="on-device uint8 loader for small in-memory datasets (auto: when the data fits it)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The "Model" group of :func:`create_parser`: the model, its input, batch size, DDP and compilation."""
    group = parser.add_argument_group("Model")
    group.add_argument("--model", default="resnet50", metavar="MODEL", help="timm model name")
    group.add_argument("--norm", default=None, type=read_spec_text, metavar="SPEC",
                       help="norm/noise spec for every norm site: bn, gbn16, gni16, nat8, xbn32, ln, gn32, a "
                            "YAML/JSON mapping or list, or the reference implementation's JSON (None: model default)")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                       help="extra keyword arguments for the model (values are Python literals or strings)")
    _switch(group, "--pretrained",
            "start from the model's pretrained weights (timm; downloads from the Hugging Face hub)")
    group.add_argument("--initial-checkpoint", default="", metavar="PATH",
                       help="load these weights before training (timm.models.load_checkpoint; its EMA weights if "
                            "it has them, as timm)")
    group.add_argument("--img-size", type=int, default=None, metavar="N",
                       help="image size H = W (None: the dataset's, 224 for ImageFolder); --input-size wins")
    group.add_argument("--bn-momentum", type=float, default=None,
                       help="momentum of every BatchNorm-like layer, ghost ones included (None: the layers' own)")
    group.add_argument("--bn-eps", type=float, default=None,
                       help="epsilon of every BatchNorm-like layer, ghost ones included (None: the layers' own)")
    _switch(group, "--grad-checkpointing", "gradient checkpointing of the timm model (model.set_grad_checkpointing)")
    group.add_argument("--num-classes", type=int, default=None, metavar="N",
                       help="number of classes (None: the dataset's)")
    group.add_argument("--input-size", default=None, nargs=3, type=int, metavar="N",
                       help="C H W of the model input (None: the dataset's, 3 224 224 for ImageFolder)")
    group.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN",
                       help="per-channel normalization mean (None: the dataset's)")
    group.add_argument("--std", type=float, nargs="+", default=None, metavar="STD",
                       help="per-channel normalization std (None: the dataset's)")
    group.add_argument("--interpolation", default="", metavar="NAME",
                       help="resize interpolation of ImageNet-style transforms ('': bilinear)")
    group.add_argument("--crop-pct", default=None, type=float, metavar="PCT",
                       help="eval center-crop fraction of ImageNet-style transforms (None: 0.875 = 224/256)")
    group.add_argument("-b", "--batch-size", type=int, default=128, metavar="N",
                       help="batch size per process and per step (a step of --grad-accum-steps)")
    group.add_argument("-vb", "--validation-batch-size", type=int, default=None, metavar="N",
                       help="eval batch size (None: --batch-size)")
    _switch(group, "--channels-last", "channels_last memory layout")
    group.add_argument("--grad-accum-steps", type=int, default=1, metavar="N",
                       help="micro-batches per optimizer update")
    group.add_argument("--drop", type=float, default=0.0, metavar="PCT",
                       help="classifier dropout rate (passed to the model as drop_rate when non-zero)")
    group.add_argument("--drop-path", type=float, default=None, metavar="PCT",
                       help="drop path rate (passed to the model as drop_path_rate when set)")
    _switch(group, "--sync-bn",
            "under DDP, turn plain BatchNorm into SyncBatchNorm (ghost norms/noise stay per process)")
    group.add_argument("--dist-bn", choices=("reduce", "broadcast", ""), default="reduce",
                       help="under DDP, before each evaluation: average (reduce) the norm layers' running "
                            "statistics over processes, copy rank 0's (broadcast), or leave them ('')")
    group.add_argument("--torchcompile", nargs="?", type=str, default=None, const="inductor", metavar="BACKEND",
                       help="torch.compile the model with this backend (flag alone: inductor)")


def _add_optimizer_flags(parser: argparse.ArgumentParser) -> None:
    """The "Optimizer" group of :func:`create_parser`: the timm optimizer."""
    group = parser.add_argument_group("Optimizer")
    group.add_argument("--opt", default="sgd", metavar="OPTIMIZER", help="timm optimizer name (sgd = Nesterov)")
    group.add_argument("--opt-eps", default=None, type=float, metavar="EPSILON", help="optimizer epsilon")
    group.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA", help="optimizer betas")
    group.add_argument("--momentum", type=float, default=0.9, metavar="M", help="optimizer momentum")
    group.add_argument("--weight-decay", type=float, default=2e-5, help="weight decay")
    group.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip gradient norm/value")
    group.add_argument("--clip-mode", type=str, default="norm", help="gradient clipping mode: norm, value or agc")
    group.add_argument("--layer-decay", type=float, default=None, help="layer-wise learning rate decay")
    group.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                       help="extra keyword arguments for the optimizer")


def _add_schedule_flags(parser: argparse.ArgumentParser) -> None:
    """The "Learning rate schedule" group of :func:`create_parser`: the timm learning rate schedule."""
    group = parser.add_argument_group("Learning rate schedule")
    group.add_argument("--sched", type=str, default="cosine", metavar="SCHEDULER", help="timm scheduler name")
    _switch(group, "--sched-on-updates", "step the schedule every optimizer update instead of every epoch")
    group.add_argument("--lr", type=float, default=None, metavar="LR",
                       help="learning rate (None: --lr-base scaled by the global batch size)")
    group.add_argument("--lr-base", type=float, default=0.1, metavar="LR",
                       help="base learning rate: lr = lr_base * global_batch_size / lr_base_size")
    group.add_argument("--lr-base-size", type=int, default=256, metavar="DIV", help="batch size of --lr-base")
    group.add_argument("--lr-base-scale", type=str, default="", metavar="SCALE",
                       help="scaling of --lr-base: linear or sqrt ('': sqrt for ada*/lamb, else linear)")
    group.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="PCT",
                       help="learning rate noise on/off epoch fractions")
    group.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT", help="lr noise limit")
    group.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV", help="lr noise std")
    group.add_argument("--lr-cycle-mul", type=float, default=1.0, metavar="MULT", help="lr cycle length multiplier")
    group.add_argument("--lr-cycle-decay", type=float, default=0.5, metavar="MULT", help="lr decay per cycle")
    group.add_argument("--lr-cycle-limit", type=int, default=1, metavar="N", help="lr cycle limit")
    group.add_argument("--lr-k-decay", type=float, default=1.0, help="lr k-decay for cosine/poly")
    group.add_argument("--warmup-lr", type=float, default=1e-5, metavar="LR", help="learning rate at warm-up start")
    group.add_argument("--min-lr", type=float, default=0.0, metavar="LR", help="lower lr bound of the schedule")
    group.add_argument("--epochs", type=int, default=300, metavar="N", help="epochs to train (the schedule's length)")
    group.add_argument("--decay-milestones", default=[90, 180, 270], type=int, nargs="+", metavar="EPOCH",
                       help="multistep decay epochs")
    group.add_argument("--decay-epochs", type=float, default=90, metavar="N", help="step decay interval")
    group.add_argument("--warmup-epochs", type=int, default=5, metavar="N", help="epochs of linear warm-up")
    _switch(group, "--warmup-prefix", "exclude the warm-up from the decay schedule")
    group.add_argument("--cooldown-epochs", type=int, default=0, metavar="N",
                       help="epochs at min_lr after the schedule")
    group.add_argument("--patience-epochs", type=int, default=10, metavar="N", help="plateau scheduler patience")
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE", help="lr decay rate")


def _add_augmentation_flags(parser: argparse.ArgumentParser) -> None:
    """The "Augmentation and regularization" group of :func:`create_parser`: crops, flips, mixup/cutmix..."""
    group = parser.add_argument_group("Augmentation and regularization")
    _switch(group, "--no-aug", "no training augmentation")
    group.add_argument("--scale", type=float, nargs="+", default=[0.08, 1.0], metavar="PCT",
                       help="RandomResizedCrop scale range (ImageNet-style transforms)")
    group.add_argument("--ratio", type=float, nargs="+", default=[3. / 4., 4. / 3.], metavar="RATIO",
                       help="RandomResizedCrop aspect ratio range (ImageNet-style transforms)")
    group.add_argument("--hflip", type=float, default=None,
                       help="horizontal flip probability (None: 0.5, but 0 for digits, which are not mirror-symmetric)")
    group.add_argument("--color-jitter", type=float, default=0.0, metavar="PCT",
                       help="color jitter of ImageNet-style transforms (timm's default is 0.4; the paper's "
                            "ImageNet recipe is RandomResizedCrop + flip only)")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (active if > 0)")
    group.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (active if > 0)")
    group.add_argument("--cutmix-minmax", type=float, nargs="+", default=None, help="cutmix min/max ratio")
    group.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    group.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    group.add_argument("--mixup-mode", type=str, default="batch", help="mixup per batch, pair or elem")
    group.add_argument("--mixup-off-epoch", default=0, type=int, metavar="N", help="turn mixup off at this epoch")
    group.add_argument("--aa", type=str, default=None, metavar="NAME",
                       help="timm AutoAugment/RandAugment/AugMix policy, e.g. rand-m9-mstd0.5-inc1, original, "
                            "augmix-m5-w4-d2 (None: off; needs the DataLoader, not the fast loader)")
    group.add_argument("--reprob", type=float, default=0.0, metavar="PCT",
                       help="random erasing probability (timm RandomErasing; needs the DataLoader)")
    group.add_argument("--remode", type=str, default="pixel", help="random erasing mode: const, rand or pixel")
    group.add_argument("--recount", type=int, default=1, help="random erasing count")


def _add_ema_flags(parser: argparse.ArgumentParser) -> None:
    """The "Model exponential moving average" group of :func:`create_parser`: the EMA of the weights."""
    group = parser.add_argument_group("Model exponential moving average")
    _switch(group, "--model-ema", "track an EMA of the weights (timm ModelEmaV3); it is evaluated and reported")
    group.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay")
    _switch(group, "--model-ema-warmup", "EMA decay warm-up")


def _add_misc_flags(parser: argparse.ArgumentParser) -> None:
    """The "Miscellaneous" group of :func:`create_parser`: seeds, logging, devices, output, resuming and wandb."""
    group = parser.add_argument_group("Miscellaneous")
    group.add_argument("--seed", type=int, default=42, metavar="S",
                       help="seed of initialization, data order, augmentation and (by default) noise")
    group.add_argument("--noise-seed", type=int, default=None, metavar="S",
                       help="seed of the noise layers' generator (None: --seed); process r uses S + r")
    group.add_argument("--log-interval", type=int, default=50, metavar="N",
                       help="optimizer updates between log lines and wandb step logs")
    group.add_argument("--checkpoint-hist", type=int, default=10, metavar="N",
                       help="checkpoint-EPOCH.pth.tar files kept besides last and best")
    group.add_argument("-j", "--workers", type=int, default=4, metavar="N", help="DataLoader worker processes")
    _switch(group, "--amp", "mixed precision (torch.autocast)")
    group.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"),
                       help="autocast dtype; float16 adds a gradient scaler")
    _switch(group, "--pin-mem", "pin DataLoader memory (on CUDA the uint8 batches are then copied asynchronously, "
                                "overlapped with compute)")
    group.add_argument("--dry-loader", type=int, default=0, metavar="BATCHES",
                       help="time the training data path alone (this many batches on the device, no model, no run "
                            "directory), print images/s and exit; 0: train")
    group.add_argument("--device", default=None, metavar="DEVICE",
                       help="cpu, cuda, cuda:1... (None: cuda if available, else cpu; torchrun: cuda:LOCAL_RANK)")
    group.add_argument("--output", default="output", metavar="PATH",
                       help="output root; the run goes to OUTPUT/EXPERIMENT")
    group.add_argument("--experiment", default="", metavar="NAME",
                       help="run name = output subfolder ('': date-model; may be a {key} template)")
    group.add_argument("--eval-interval", type=int, default=1, metavar="EPOCHS",
                       help="evaluate every this many epochs (and always after the last); the best checkpoint is "
                            "chosen among evaluated epochs")
    group.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"),
                       help="metric of the best checkpoint (loss: lowest)")
    group.add_argument("--resume", default="", metavar="auto|PATH",
                       help="auto: continue OUTPUT/EXPERIMENT/last.pth.tar if it exists, else start fresh; "
                            "PATH: continue this checkpoint")
    _switch(group, "--no-resume-opt", "when resuming, do not restore the optimizer (and gradient scaler) state")
    _switch(group, "--resume-allow-changes",
            "resume even if the checkpoint's result-changing arguments differ from these")
    _switch(group, "--start-fresh", "the run directory holds results of an earlier run: move them into "
                                    "OUTPUT/EXPERIMENT/superseded-TIMESTAMP/ and start anew (without it, such a "
                                    "directory is only resumed or refused)")
    group.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                       help="end this process once this many epochs are done (status preempted, resumable); "
                            "the schedule still spans --epochs")
    group.add_argument("--nonfinite", default="stop", choices=("stop", "skip"),
                       help="on a NaN/inf loss or gradient: stop (exit 3, the last good checkpoint kept) or skip "
                            "the update and count it in the log")
    group.add_argument("--log-noise-every", type=int, default=None, metavar="K",
                       help="every K updates, log the shift/scale statistics of every ghost noise and ghost batch "
                            "norm site to wandb and OUTPUT/EXPERIMENT/noise_monitor.csv (shared.noise_monitor; "
                            "None: off)")
    group.add_argument("--log-wandb", action=argparse.BooleanOptionalAction, default=False,
                       help="log to Weights & Biases (offline by itself without credentials); --no-log-wandb "
                            "turns off a config's log_wandb: true")
    group.add_argument("--wandb-project", default=None, type=str, metavar="NAME", help="wandb project")
    group.add_argument("--wandb-tags", default=[], type=str, nargs="+", metavar="TAG", help="wandb tags")
    group.add_argument("--wandb-name", default=None, type=str, metavar="NAME",
                       help="wandb display name (None: the experiment name)")
    # torch.distributed.launch passes --local-rank (older: --local_rank); torchrun sets LOCAL_RANK instead.
    group.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=0, help=argparse.SUPPRESS)


def create_parser() -> argparse.ArgumentParser:
    """train.py's argument parser (no config handling: see :func:`parse_args`)."""
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train a timm model with a norm/noise spec (ghost-noise harness).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # NOTE: help texts say what None/'' means; the formatter appends the default value itself.
    parser.add_argument("-c", "--config", default="", metavar="FILE",
                        help="YAML config: keys are argument dests; flags given on the command line override it")

    _add_dataset_flags(parser)
    _add_model_flags(parser)
    _add_optimizer_flags(parser)
    _add_schedule_flags(parser)
    _add_augmentation_flags(parser)
    _add_ema_flags(parser)
    _add_misc_flags(parser)
    return parser


# ----------------------------------------------------------------------------------------------
# YAML files
# ----------------------------------------------------------------------------------------------

def actions_by_dest(parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """``{dest: action}`` of train.py's flags but -h and -c (``parser``: :func:`create_parser`)."""
    return {action.dest: action for action in (parser or create_parser())._actions
            if action.option_strings and action.dest not in ("help", "config")}


def _close_matches(word: str, candidates: Iterable[str]) -> str:
    hint = difflib.get_close_matches(word.replace("-", "_"), list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(h) for h in hint)}?)" if hint else ""


def _read_yaml(path: str) -> tuple[dict, dict]:
    """A YAML file's top-level mapping and each key's line number (1-based)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path!r} cannot be read: {error}") from None
    try:
        node, data = load_bounded_yaml(text, path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else path
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"YAML syntax error in {where}: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of argument names to values, "
                          f"got a {type(data).__name__}")
    # a mapping document composes to a MappingNode: its key nodes know their lines
    return data, {key.value: key.start_mark.line + 1 for key, _ in node.value}


def check_key(key: Any, actions: Mapping[str, argparse.Action], context: str) -> None:
    """A sweep or ``--set`` key must be a train.py argument dest or a dotted path into one."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{context}: keys must be non-empty strings, got {key!r}")
    root = key.split(".", 1)[0]
    if root not in actions:
        raise ConfigError(f"{context}: {key!r} is not a train.py argument{_close_matches(root, actions)}")


def _check_sweep(grid: Any, actions: Mapping[str, argparse.Action], where: str) -> None:
    """``sweep:`` must map argument names (or dotted paths into them, or ``cases``) to non-empty lists."""
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: 'sweep' must be a mapping of argument -> list of values, "
                          f"got {type(grid).__name__}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: sweep key {key!r} needs a non-empty list of values, got {values!r}")
        if key != SWEEP_CASES_KEY:
            check_key(key, actions, f"{where}: sweep")
            continue
        for number, case in enumerate(values):
            if not isinstance(case, dict) or not case:
                raise ConfigError(f"{where}: sweep.cases[{number}] must be a non-empty mapping, "
                                  f"got {case!r}")
            for case_key in case:
                check_key(case_key, actions, f"{where}: sweep.cases[{number}]")


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value checked against (and converted to) what the flag would produce."""
    dest = action.dest

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {dest}: expected {expected}, got {value!r} ({type(value).__name__})")

    if value is None:
        return None
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise fail("a mapping of keyword -> value")
        return copy.deepcopy(value)
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if dest == "norm":
        if not isinstance(value, (str, list, dict)):
            raise fail("a spec (string, mapping or list)")
        read_spec_text(value, f"{where}: norm")  # only the limits: spec text stays text, as written
        return copy.deepcopy(value)
    if dest == "torchcompile" and isinstance(value, bool):
        return action.const if value else None

    convert = action.type or str
    kind = "string" if convert is str else getattr(convert, "__name__", "value")
    choices = action.choices or ()
    if isinstance(value, bool) and "on" in choices and "off" in choices:
        return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean

    def scalar(item: Any) -> Any:
        if isinstance(item, (list, dict)):
            raise fail("a single value")
        if isinstance(item, bool):  # YAML's true/false is never a number or a text here
            raise fail(f"a {kind}")
        if convert is str:
            if choices and str(item) not in choices:
                raise fail(f"one of {', '.join(map(repr, choices))}")
            return str(item)
        if convert is int and isinstance(item, float):
            raise fail("an integer (written without a decimal point)")
        try:
            return convert(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise fail(f"a {kind} ({error})") from None

    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise fail("a list")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise fail(f"a list of {action.nargs} values")
        if action.nargs == "+" and not value and action.default != []:
            # An empty list is the flag's own default for e.g. wandb_tags (args.yaml writes it back).
            raise fail("a non-empty list")
        return [scalar(item) for item in value]
    return scalar(value)


def _load_merged(path: str, actions: Mapping[str, argparse.Action], chain: tuple) -> dict:
    real = os.path.realpath(path)
    if real in chain:
        cycle = " -> ".join(os.path.relpath(p) for p in (*chain, real))
        raise ConfigError(f"config bases form a cycle: {cycle}")
    data, lines = _read_yaml(path)
    bases = data.pop(BASES_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}, line {lines.get(BASES_KEY, '?')}: 'bases' must be a list of relative paths, "
                          f"got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)  # an absolute base stays as it is
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}, line {lines.get(BASES_KEY, '?')}: base config {base!r} not found "
                              f"(looked for {os.path.normpath(base_path)})")
        merged.update(_load_merged(base_path, actions, (*chain, real)))
    for key, value in data.items():
        where = f"{path}, line {lines.get(key, '?')}"
        if key == SWEEP_KEY:
            _check_sweep(value, actions, where)
        elif key not in actions:
            raise ConfigError(f"{where}: unknown key {key!r}{_close_matches(str(key), actions)}; keys are "
                              f"train.py argument dests (batch_size, weight_decay, ...) or {BASES_KEY}, {SWEEP_KEY}")
        merged[key] = value if key == SWEEP_KEY else _coerce(actions[key], value, where)
    return merged


def load_config(path: str, parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """A config file's values with its bases merged in, checked against train.py's arguments.

    Args:
        path: the YAML file.
        parser: the parser to check keys against (default: :func:`create_parser`).

    Returns:
        ``{dest: value}`` in merge order; ``sweep`` is kept (validated), ``bases`` is consumed.
        Templates are not formatted yet (that needs the command line: :func:`parse_args`).

    Raises:
        ConfigError: missing file, YAML syntax error (with line), unknown key (with close matches),
            wrongly typed value, bad ``bases`` or ``sweep``, a cycle of bases.
    """
    return _load_merged(str(path), actions_by_dest(parser), ())


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------

# A placeholder: {key} or {key[item][item]}, with an optional format spec ({lr:g}). JSON or YAML
# text ('{"subtype": "gbn2d"}', '{subtype: gbn2d, size: 16}') never matches: a quote or a space.
# The attribute group only exists to refuse {seed.real} loudly rather than leave it in a run name.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)((?:\[[^\[\]{}]+\])*)(\.[\w.\[\]]*)?(?::([^{}\s]*))?\}")


def strings_in(value: Any) -> list:
    """Every string of ``value``, also those inside lists, tuples and mapping values (at any depth)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    items = value if isinstance(value, (list, tuple)) else ()  # a number, a bool, None...: no strings
    return [text for item in items for text in strings_in(item)]


def _field_value(match: re.Match, values: Mapping[str, Any]) -> str:
    """The text of one placeholder, formatted from ``values`` (a plain value, not a template)."""
    name, items, attribute, spec = match.groups()
    if attribute:
        raise ConfigError(f"template field {match[0]}: attribute access is not allowed "
                          f"(use {{key}} or item access {{key[item]}})")
    if name not in values:
        raise ConfigError(f"template placeholder {{{name}}} names no argument{_close_matches(name, values)}")
    value = values[name]
    if any(_PLACEHOLDER.search(text) for text in strings_in(value)):  # a template, formatted or not
        raise ConfigError(f"template field {match[0]}: {name} is itself a template ({value!r}); "
                          f"a placeholder may name only plain values")
    for item in re.findall(r"\[([^\]]+)\]", items):
        try:  # as str.format: digits index a list, anything else is a mapping key
            value = value[int(item) if item.isdigit() else item]
        except (KeyError, IndexError, TypeError):
            raise ConfigError(f"template field {match[0]}: {name} has no item {item!r} "
                              f"(its value is {value!r})") from None
    return format(value, spec or "")


def _format_value(value: Any, values: Mapping[str, Any]) -> Any:
    """``value`` with every placeholder of its strings (inside lists and mappings too) formatted."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda match: _field_value(match, values), value)
    if isinstance(value, list):
        return [_format_value(item, values) for item in value]
    if isinstance(value, dict):
        return {key: _format_value(item, values) for key, item in value.items()}
    return value


def format_templates(values: dict) -> dict:
    """Format every ``{key}`` template of ``values`` with the values themselves.

    A placeholder names a plain value (not another template). Returns a new dict; ``values`` is
    unchanged.

    Raises:
        ConfigError: naming the key, its value and the placeholder: an unknown key (with close
            matches), a key that is itself a template, attribute access, a missing item, a format
            spec that does not fit the value.
    """
    formatted = {}
    for key, value in values.items():
        try:
            formatted[key] = _format_value(value, values)
        except (ValueError, TypeError) as error:  # ConfigError, or a format spec that does not fit
            raise ConfigError(f"{key}: {value!r}: {error}") from None
    return formatted


# ----------------------------------------------------------------------------------------------
# Command line + config
# ----------------------------------------------------------------------------------------------

def parser_defaults() -> dict:
    """``{dest: default}`` of every train.py flag (an argument absent from an older checkpoint had it)."""
    return {dest: action.default for dest, action in actions_by_dest().items()}


def args_to_dict(args: argparse.Namespace | Mapping) -> dict:
    """Arguments as plain YAML/JSON-able Python (tuples -> lists), for args.yaml and checkpoints."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(dict(vars(args) if isinstance(args, argparse.Namespace) else args))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Resolve train.py's arguments: defaults < config file (bases, then file) < command-line flags.

    Args:
        argv: command-line words (default: ``sys.argv[1:]``).

    Returns:
        The namespace with every template formatted. ``args.config`` is the config path ('' if none).

    Raises:
        ConfigError: a bad config file or template (see :func:`load_config`, :func:`format_templates`).
        SystemExit: argparse's usage errors on the command line itself (exit code 2), and ``--help``.
    """
    parser = create_parser()
    # -c alone first (no -h: `-c FILE --help` lists the config's values as the defaults)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default="")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        values = load_config(known.config, parser)
        values.pop(SWEEP_KEY, None)
        parser.set_defaults(**values)
    return argparse.Namespace(**format_templates(vars(parser.parse_args(argv))))


def yaml_text(args: argparse.Namespace | Mapping) -> str:
    """The resolved arguments as the text of args.yaml (sorted keys, one per line)."""
    return yaml.safe_dump(args_to_dict(args), default_flow_style=False, sort_keys=True)
