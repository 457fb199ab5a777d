"""Part tables of the spec language: names -> constructors, reference keyword renames, presets.

Each row of :data:`PART_TYPES` says how one spec name (``gbn2d``, alias ``gbn``...) becomes a module:
its target constructor (a class or function called with the channel count and the keywords), the
reference implementation's keyword names and how they map onto ours, which keyword the number of a
short string sets (``gbn16`` -> ``ghost_batch_size=16``) and which layouts it supports.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
from typing import Any, Callable, Iterable, Mapping, Optional

import torch.nn as nn
from timm.layers import (
    FilterResponseNormTlu2d, LayerNorm, LayerNorm2d, get_act_layer, get_norm_layer,
)

import nodo

LAYOUTS = ("channels_first", "channels_last")
CHANNELS_FIRST, CHANNELS_LAST = LAYOUTS
# Arguments the norm site supplies itself; a spec may not set them.
SITE_ARGS = ("num_features", "device", "dtype", "layout", "generator")


class SpecError(ValueError):
    """A norm/noise spec could not be parsed or names something that does not exist."""


def suggest(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x' or 'y'?)`` for the close matches of ``word``, else an empty string."""
    matches = difflib.get_close_matches(str(word), sorted(set(candidates)), n=3, cutoff=0.6)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"


# ----------------------------------------------------------------------------------------------
# Part tables
# ----------------------------------------------------------------------------------------------

def _layer_norm(num_features: int, eps: float = 1e-5, affine: bool = True, bias: bool = True, *,
                layout: str = CHANNELS_FIRST, device=None, dtype=None) -> nn.Module:
    """LayerNorm over the channel dim; eps defaults to PyTorch's 1e-5 (timm's classes default to 1e-6)."""
    cls = LayerNorm if layout == CHANNELS_LAST else LayerNorm2d
    return cls(num_features, eps=eps, affine=affine, bias=bias, device=device, dtype=dtype)


def _group_norm(num_features: int, num_groups: Optional[int] = None, channels_per_group: Optional[int] = None,
                eps: float = 1e-5, affine: bool = True, *, device=None, dtype=None) -> nn.GroupNorm:
    """GroupNorm with either ``num_groups`` or ``channels_per_group`` (the reference's ``G`` / ``CpG``)."""
    if (num_groups is None) == (channels_per_group is None):
        raise SpecError(f"gn needs exactly one of num_groups (G) or channels_per_group (CpG), got "
                        f"num_groups={num_groups!r}, channels_per_group={channels_per_group!r}")
    if num_groups is None:
        if num_features % channels_per_group:
            raise SpecError(f"gn: channels_per_group={channels_per_group} does not divide num_features={num_features}")
        num_groups = num_features // channels_per_group
    if num_features % num_groups:
        raise SpecError(f"gn: num_groups={num_groups} does not divide num_features={num_features}")
    return nn.GroupNorm(num_groups, num_features, eps=eps, affine=affine, device=device, dtype=dtype)


def _identity(num_features: Optional[int] = None, *, device=None, dtype=None) -> nn.Identity:
    return nn.Identity()


@dataclasses.dataclass(frozen=True)
class OnlyValue:
    """A reference option of which we implement one value: accepted (and not passed on) if the
    spec gives ``value``, else a SpecError with ``message`` (``{given!r}`` is the value given)."""
    value: Any
    message: str


_REF_GHOST = {"batch_size": "ghost_batch_size"}
_REF_NOISE = {**_REF_GHOST, "shift_noise": "shift", "scale_noise": "scale",
              "channel_last": ("channel_dim", lambda channel_last: -1 if channel_last else 1)}


@dataclasses.dataclass(frozen=True)
class PartType:
    """One row of a part table: how a spec name becomes a module."""
    kind: str
    name: str
    target: Callable[..., nn.Module]
    aliases: tuple = ()
    # reference name -> ours, (ours, converter of the value) or OnlyValue
    keyword_aliases: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    number_arg: Optional[str] = None  # what the N of a short string ``gbn16`` sets
    layouts: tuple = LAYOUTS
    has_shift_scale: bool = False  # accepts the short string variants -shift / -scale


_CF_ONLY = (CHANNELS_FIRST,)
PART_TYPES = (
    PartType("norm", "bn2d", nn.BatchNorm2d, ("bn", "batchnorm", "batchnorm2d"), layouts=_CF_ONLY),
    PartType("norm", "gbn2d", nodo.GhostBatchNorm2d, ("gbn", "ghost_batch_norm"),
             keyword_aliases=_REF_GHOST, number_arg="ghost_batch_size", layouts=_CF_ONLY),
    PartType("norm", "en2d", nodo.EvalNorm2d, ("ebn", "en", "eval_norm"),
             keyword_aliases=_REF_GHOST, number_arg="ghost_batch_size", layouts=_CF_ONLY),
    PartType("norm", "xbn2d", nodo.ExclusiveBatchNorm2d, ("xbn", "exclusive_batch_norm"),
             keyword_aliases=_REF_GHOST, number_arg="ghost_batch_size", layouts=_CF_ONLY),
    PartType("norm", "gnbn2d", nodo.GhostNoiseBatchNorm2d, ("ghost_noise_batch_norm",),
             keyword_aliases={**_REF_GHOST, "shift_noise": "shift", "scale_noise": "scale"},
             number_arg="ghost_batch_size", layouts=_CF_ONLY, has_shift_scale=True),
    PartType("norm", "brn", nodo.BatchRenorm2d, ("batch_renorm", "brn2d"), layouts=_CF_ONLY),
    PartType("norm", "gn", _group_norm, ("groupnorm",),
             keyword_aliases={"G": "num_groups", "CpG": "channels_per_group"},
             number_arg="num_groups", layouts=_CF_ONLY),
    PartType("norm", "ln", _layer_norm, ("layernorm",)),
    PartType("norm", "frn", FilterResponseNormTlu2d, ("filter_response_norm",), layouts=_CF_ONLY),
    PartType("norm", "identity", _identity, ("none",)),
    PartType("noise", "gnir", nodo.GhostNoiseInjector,
             ("ghost_noise_injector_rep", "ghost_noise_injector", "ghost_noise"),
             keyword_aliases=_REF_NOISE, number_arg="ghost_batch_size", has_shift_scale=True),
    PartType("noise", "nat", nodo.NoisyAffine, ("noisy_affine", "noisy_affine_transform"),
             keyword_aliases={**_REF_NOISE, "scale_shift": OnlyValue(
                 False, "nat: scale_shift={given!r} (scaling the shift noise by each sample's "
                        "spatial std) is not implemented; the paper's runs use scale_shift=False, "
                        "which is what nodo.NoisyAffine does")},
             number_arg="ghost_batch_size", has_shift_scale=True),
    PartType("noise", "dropout", nn.Dropout, keyword_aliases={"drop_probability": "p"}),
    PartType("noise", "flexible_dropout", nodo.FlexibleDropout, keyword_aliases={
        # the reference's noise_type='gaussian' is its std p/(1-p): nodo's kind 'gaussian_reference'
        "drop_probability": "p",
        "noise_type": ("kind", lambda noise_type: "gaussian_reference" if noise_type == "gaussian" else noise_type),
        "scaling_type": OnlyValue("mean", "flexible_dropout: scaling_type={given!r} is not "
                                          "implemented; nodo's FlexibleDropout always keeps the "
                                          "mean (scaling_type='mean')"),
        "max_steps": OnlyValue(math.inf, "flexible_dropout: max_steps={given!r} (switching dropout "
                                         "off after some steps) is not implemented")}),
    PartType("gain", "gain", nodo.Gain, ("standard",)),
    PartType("bias", "bias", nodo.Bias, ("standard",)),
    PartType("activation", "relu", nn.ReLU),
    PartType("activation", "leaky_relu", nn.LeakyReLU),
    PartType("activation", "gelu", nn.GELU),
    PartType("activation", "silu", nn.SiLU, ("swish",)),
    PartType("conv", "conv2d", nn.Conv2d, ("standard",)),
    # WS: 'ws' is nodo's standard (keeps the init scale); the reference's own names 'wsconv2d' /
    # 'wslinear' select its fan-in scaling, which the paper's WS rows were trained with.
    PartType("conv", "ws", nodo.WSConv2d, ("ws_init",)),
    PartType("conv", "wsconv2d", functools.partial(nodo.WSConv2d, scaling="fan_in"),
             ("ws_fan_in",)),
    PartType("linear", "linear", nn.Linear, ("standard",)),
    PartType("linear", "ws", nodo.WSLinear, ("ws_init",)),
    PartType("linear", "wslinear", functools.partial(nodo.WSLinear, scaling="fan_in"),
             ("ws_fan_in",)),
)
KINDS = ("norm", "noise", "gain", "bias", "activation", "conv", "linear")
KIND_ALIASES = {"dropout": "noise", "act": "activation"}  # the reference filed dropout under "noise"
TABLE = {kind: {n: row for row in PART_TYPES if row.kind == kind for n in (row.name, *row.aliases)}
         for kind in KINDS}

# Which part kinds each kind of site accepts, and where a mapping without ``type`` is looked up first.
SITES = {
    "norm": ("norm", "noise", "gain", "bias", "activation"),
    "noise": ("noise", "gain", "bias", "activation"),
    "conv": ("conv",),
    "linear": ("linear",),
}
# Short-string presets (expanded by preset_parts): gniN and natN.
PRESETS = ("gni", "nat")
# Names kept for the suggestions only: timm's norm names resolve through get_norm_layer at run time.
TIMM_NORM_HINTS = ("batchnorm1d", "groupnorm1", "layernorm2d", "rmsnorm", "rmsnorm2d", "simplenorm",
                    "simplenorm2d", "frozenbatchnorm2d", "layernormfp32", "layernorm2dfp32")


# ----------------------------------------------------------------------------------------------
# Parsed spec
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PartSpec:
    """One validated part: ``kind`` and canonical ``subtype`` of a table row, canonical keyword names."""
    kind: str
    subtype: str
    kwargs: tuple = ()  # sorted (name, value) pairs, hashable

    @property
    def options(self) -> dict:
        return dict(self.kwargs)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.subtype}({args})" if args else self.subtype


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """A parsed spec: its parts in order and the layout of the site it is built for."""
    parts: tuple
    layout: str = CHANNELS_FIRST

    def __str__(self) -> str:
        body = ", ".join(str(p) for p in self.parts)
        return f"[{body}]" if len(self.parts) != 1 else body


def make_part(kind: str, subtype: str, **kwargs) -> PartSpec:
    return PartSpec(kind, subtype, tuple(sorted(kwargs.items())))


def preset_parts(name: str, number: Optional[int], shift: bool, scale: bool) -> list:
    """The paper's two noise presets, as the same parts the reference's JSON spells out."""
    if number is None:
        raise SpecError(f"'{name}' needs a ghost batch size, e.g. '{name}16'")
    noise = make_part("noise", "gnir" if name == "gni" else "nat", ghost_batch_size=number, shift=shift, scale=scale)
    return [make_part("norm", "bn2d", affine=False), noise, make_part("gain", "gain"), make_part("bias", "bias")]


TAKES_FEATURES = ("norm", "gain", "bias")  # part kinds built as ``cls(num_features, ...)``


def timm_row(kind: str, name: str) -> Optional[PartType]:
    """A row for a norm (``rmsnorm2d``...) or an activation that timm's public ``get_norm_layer`` /
    ``get_act_layer`` knows by name, else None."""
    try:
        cls = get_norm_layer(name) if kind == "norm" else get_act_layer(name)
    except (KeyError, AssertionError, ValueError):
        return None
    return PartType(kind, name, cls) if isinstance(cls, type) else None


def row_of(part: PartSpec) -> PartType:
    """The table row a parsed part came from (a timm norm or activation name if in none)."""
    return TABLE[part.kind].get(part.subtype) or timm_row(part.kind, part.subtype)


def parameters_of(row: PartType) -> list:
    """The target constructor's ``inspect.Parameter`` list (empty if it has no readable signature)."""
    try:
        return list(inspect.signature(row.target).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature
        return []


def accepted_arguments(row: PartType) -> tuple[dict, bool]:
    """The keywords a spec may set ``{name: default}`` and whether the target takes ``**kwargs``.

    The site's own arguments are removed: ``device``, ``dtype``, ``layout``, ``generator``, and for
    norm / gain / bias parts the first parameter, the channel count, whatever its name (timm's
    classes call it ``num_channels``).
    """
    params = parameters_of(row)
    if row.kind in TAKES_FEATURES and params and params[0].kind in (params[0].POSITIONAL_ONLY,
                                                                     params[0].POSITIONAL_OR_KEYWORD):
        params = params[1:]
    # **kwargs, or a timm norm whose signature cannot be read: anything goes, its constructor will check
    varkw = any(p.kind is p.VAR_KEYWORD for p in params) or (not params and row.kind == "norm")
    accepted = {p.name: p.default for p in params
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in SITE_ARGS}
    return accepted, varkw


def target_name(row: PartType) -> str:
    qualname = getattr(row.target, "__qualname__", row.target)
    return f"{getattr(row.target, '__module__', '?')}.{qualname}"

