"""Norm sites of a built model: find them, put a spec at each one, and report what changed.

A *norm site* is a normalization layer of a model (BatchNorm, GroupNorm, LayerNorm, RmsNorm, timm's
norm+activation layers such as ``BatchNormAct2d``, nodo's norms). :func:`replace_norm_sites` builds the
spec at each site of an existing model, which is how :func:`shared.create_model` applies ``norm=`` to a
stock timm model:

* the layout of each site comes from its class: BatchNorm / GroupNorm / ``LayerNorm2d`` see
  ``(N, C, H, W)`` (channels_first); ``nn.LayerNorm`` / ``RmsNorm`` see ``(N, ..., C)`` tokens
  (channels_last). A spec that needs ``(N, C, H, W)`` at a token site is an error naming the site;
* the site's ``eps`` (and BN ``momentum``) carry over to a spec norm of the same family (LN -> ``ln``,
  BN -> ``bn``/``gbn``/``gni``...) unless the spec sets them, so ViT's LayerNorm keeps eps 1e-6;
* ``weight``, ``bias`` and running statistics are copied where names and shapes match (pretrained
  weights, timm's zero-init of last norms), and the site's ``drop`` / ``act`` children (timm's
  norm+activation layers) are kept, applied after the new layer: no activation is ever removed;
* nothing but the norm sites changes (:func:`nodo.convert.replace_modules` swaps exactly those modules).

The :class:`SiteReport` says how many sites were replaced by what, how many noise sites the model now
has, and the activation and parameter counts before and after.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional

import timm.layers
import yaml
from torch import nn

import nodo
from nodo.convert import append_after, carry_over, detach_after, replace_modules
from shared.specs._build import NormSequence, create_norm_factory, first_tensor
from shared.specs._parse import parse_spec
from shared.specs._table import CHANNELS_FIRST, CHANNELS_LAST, NormSpec, SpecError, accepted_arguments, row_of

__all__ = ["SiteReport", "replace_norm_sites", "census", "site_layout", "count_activations"]

# timm.layers classes by the layout they normalize (looked up by name: a timm without one just lacks it)
_TIMM_CHANNELS_FIRST = ("LayerNorm2d", "LayerNormAct2d", "LayerNorm2dFp32", "LayerNormAct2dFp32", "RmsNorm2d",
                        "RmsNormAct2d", "RmsNorm2dFp32", "RmsNormAct2dFp32", "SimpleNorm2d", "SimpleNorm2dFp32",
                        "GroupNorm1", "GroupNormAct", "GroupNorm1Act", "BatchNormAct2d", "SyncBatchNormAct")
_TIMM_CHANNELS_LAST = ("LayerNorm", "LayerNormAct", "LayerNormFp32", "LayerNormActFp32", "RmsNorm", "RmsNormAct",
                       "RmsNormFp32", "RmsNormActFp32", "SimpleNorm", "SimpleNormFp32")
_NOISE_TYPES = (nodo.GhostNoiseInjector, nodo.NoisyAffine, nodo.GhostNoiseBatchNorm2d, nodo.FlexibleDropout)
_NOT_ACTIVATIONS = ("MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d")
# What to say when a model's token sites refuse a channels-first spec, by model class name
_LAYOUT_HINTS = {"ConvNeXt": " (ConvNeXt: pass conv_mlp=True, e.g. --model-kwargs conv_mlp=True, so that every "
                             "norm site sees (N, C, H, W))"}


def _timm_classes(names: tuple) -> tuple:
    return tuple(getattr(timm.layers, name) for name in names if hasattr(timm.layers, name))


# The norm classes by layout; channels_first is checked first (LayerNorm2d is an nn.LayerNorm).
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, nodo.GhostBatchNorm2d, nodo.EvalNorm2d,
                nodo.ExclusiveBatchNorm2d, nodo.GhostNoiseBatchNorm2d)
_CHANNELS_FIRST_NORMS = (_BATCH_NORMS + (nn.GroupNorm, nn.InstanceNorm2d)
                         + _timm_classes(_TIMM_CHANNELS_FIRST))
_CHANNELS_LAST_NORMS = ((nn.LayerNorm,) + tuple(c for c in (getattr(nn, "RMSNorm", None),) if c)
                        + _timm_classes(_TIMM_CHANNELS_LAST))
# Norm families (site classes, spec norms): a site's eps / momentum carry over to a spec norm of its family only
_FAMILIES = ((_BATCH_NORMS, ("bn2d", "gbn2d", "en2d", "xbn2d", "gnbn2d")), (nn.LayerNorm, ("ln",)),
             (nn.GroupNorm, ("gn",)))


def site_layout(module: nn.Module) -> Optional[str]:
    """'channels_first' or 'channels_last' for a norm site, 'unsupported' for other norms (1d/3d), else None."""
    if isinstance(module, _CHANNELS_FIRST_NORMS):
        return CHANNELS_FIRST
    if isinstance(module, _CHANNELS_LAST_NORMS):
        return CHANNELS_LAST
    if isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm1d/3d, InstanceNorm1d/3d
        return "unsupported"
    return None


def _num_features(name: str, module: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    shape = getattr(module, "normalized_shape", None)
    shape = (shape,) if isinstance(shape, int) else tuple(shape or ())
    if len(shape) != 1:
        raise SpecError(f"norm site {name} ({type(module).__name__}) normalizes over {shape}, not one channel "
                        f"dimension; a spec cannot replace it")
    return shape[0]


def count_activations(model: nn.Module) -> int:
    """Activation modules in ``model`` (torch's ``nn.ReLU``, ``nn.GELU``... and timm's activation classes)."""
    classes = [type(module) for module in model.modules()]
    return sum(cls.__module__.startswith(("torch.nn.modules.activation", "timm.layers.activations"))
               and cls.__name__ not in _NOT_ACTIVATIONS for cls in classes)


def _top_sites(model: nn.Module) -> dict:
    """``{name: module}`` of the outermost norm sites (a norm inside a composite site is part of that site)."""
    sites: dict = {}
    for name, module in model.named_modules():
        is_site = site_layout(module) is not None or isinstance(module, NormSequence)
        if is_site and not any(name.startswith(f"{outer}.") for outer in sites):
            sites[name] = module
    return sites


def census(model: nn.Module) -> dict:
    """Counts that describe a model's norm sites: ``{norm_sites: {class: n}, noise_sites, activations, parameters}``."""
    sites = collections.Counter(type(m).__name__ for m in _top_sites(model).values())
    return {"norm_sites": dict(sorted(sites.items())),
            "noise_sites": sum(isinstance(m, _NOISE_TYPES) for m in model.modules()),
            "activations": count_activations(model),
            "parameters": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SiteReport:
    """What putting a spec at a model's norm sites did.

    ``replaced`` maps ``"OldClass -> NewClass"`` to the number of sites; ``before`` / ``after`` are
    :func:`census` of the model before and after (norm sites by class, noise sites, activations, parameters).
    """
    spec: str
    replaced: dict
    before: dict
    after: dict

    @property
    def sites(self) -> int:
        return sum(self.replaced.values())

    @property
    def noise_sites_added(self) -> int:
        return self.after["noise_sites"] - self.before["noise_sites"]

    def as_dict(self) -> dict:
        """JSON-ready: for results.json, args and the wandb config."""
        return {"spec": self.spec, "sites": self.sites, "replaced": dict(self.replaced),
                "noise_sites": self.after["noise_sites"], "noise_sites_added": self.noise_sites_added,
                "activations": [self.before["activations"], self.after["activations"]],
                "parameters": [self.before["parameters"], self.after["parameters"]]}

    def __str__(self) -> str:
        replaced = ", ".join(f"{n} x {what}" for what, n in self.replaced.items())
        return (f"norm {self.spec}: {self.sites} norm sites replaced ({replaced}); "
                f"{self.after['noise_sites']} noise sites ({self.noise_sites_added:+d}); "
                f"activations {self.before['activations']} -> {self.after['activations']}; "
                f"parameters {self.before['parameters']:,} -> {self.after['parameters']:,}")


def compare(spec: Any, before: dict, after: dict) -> SiteReport:
    """A report from two censuses (a model built with its default norms and with ``spec``): every site of
    ``after`` counts as replaced (used for models that apply the spec themselves)."""
    replaced = {f"{' + '.join(before['norm_sites'])} -> {cls}": n for cls, n in after["norm_sites"].items()}
    return SiteReport(_spec_text(spec), replaced, before, after)


def _spec_text(spec: Any) -> str:
    """The spec as a user writes it: text as given, lists and mappings as flow YAML (``[ln, gnir12]``)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, (list, tuple, dict)):
        try:
            return yaml.safe_dump(spec, default_flow_style=True, sort_keys=False, width=10 ** 6).strip()
        except yaml.YAMLError:
            pass
    return repr(spec)


# ----------------------------------------------------------------------------------------------
# Replacing the norm sites of a built model
# ----------------------------------------------------------------------------------------------

def _site_kwargs(site: nn.Module, spec: Optional[NormSpec]) -> dict:
    """The site's ``eps`` / ``momentum`` for the spec's norm part, if that is of the site's family and does not
    set them itself."""
    if spec is None:  # a plain factory: it gets only (num_features, device, dtype)
        return {}
    norm = next((p for p in spec.parts if p.kind == "norm"), None)
    if norm is None or not any(isinstance(site, classes) and norm.subtype in subtypes
                               for classes, subtypes in _FAMILIES):
        return {}
    accepted, _ = accepted_arguments(row_of(norm))
    return {name: getattr(site, name) for name in ("eps", "momentum")
            if name in accepted and name not in norm.options and isinstance(getattr(site, name, None), float)}


def _bad_fit(name: str, site: nn.Module, spec: Any, layout: str, error: Exception, model: nn.Module) -> SpecError:
    """The error for a spec that does not fit a site: the site, what it normalizes, and what to use there."""
    what = f"norm site {name} ({type(site).__name__})"
    if layout == CHANNELS_LAST:
        hint = _LAYOUT_HINTS.get(type(model).__name__, "")
        return SpecError(f"{what} normalizes channels-last (N, ..., C) activations such as transformer tokens; spec "
                         f"{_spec_text(spec)!r} contains a part that needs (N, C, H, W) input ({_needs_2d(spec)}). "
                         f"Use a LayerNorm spec there, e.g. 'ln' or '[ln, gnir12]'{hint}")
    return SpecError(f"{what}: spec {_spec_text(spec)!r} does not fit: {error}")


def _needs_2d(spec: Any) -> str:
    """The parts of ``spec`` that only take channels-first input, e.g. 'bn2d'."""
    parts = parse_spec(spec).parts
    return ", ".join(p.subtype for p in parts if CHANNELS_LAST not in row_of(p).layouts) or "?"


def _device_dtype(module: nn.Module) -> tuple:
    tensor = first_tensor(module)
    return (tensor.device, tensor.dtype) if tensor is not None and tensor.is_floating_point() else (None, None)


class _SiteBuilder:
    """Builds ``spec`` for one site at a time: a factory per layout, parsed once (a spec that does not fit a layout
    is raised at the first site of that layout, naming it)."""

    def __init__(self, model: nn.Module, spec: Any, layout: Optional[str]):
        self.model, self.spec, self.forced_layout = model, spec, layout
        self.factories: dict = {}
        self.replaced: collections.Counter = collections.Counter()

    def __call__(self, name: str, site: nn.Module) -> Optional[nn.Module]:
        if isinstance(site, NormSequence):
            return site  # already a composite site: left as it is, not entered
        layout = site_layout(site)
        if layout is None:
            return None
        if layout == "unsupported":
            raise SpecError(f"norm site {name} ({type(site).__name__}) normalizes 1d or 3d activations; the specs "
                            f"build 2d layers (N, C, H, W) or token layers (N, ..., C)")
        if self.forced_layout is not None and self.forced_layout != layout:
            raise SpecError(f"norm site {name} ({type(site).__name__}) is {layout}, but norm_layout="
                            f"{self.forced_layout!r} was given; leave norm_layout out (it is detected per site)")
        try:
            after = detach_after(name, site)
        except ValueError as err:
            raise SpecError(str(err)) from None
        num_features = _num_features(name, site)
        device, dtype = _device_dtype(site)
        try:  # parsed at the first site of each layout: a spec that does not fit stops the replacement there
            if layout not in self.factories:
                self.factories[layout] = create_norm_factory(self.spec, layout=layout)
            factory = self.factories[layout]
            spec = getattr(factory, "keywords", {}).get("spec")
            new = factory(num_features, device=device, dtype=dtype, **_site_kwargs(site, spec))
        except SpecError as err:
            raise _bad_fit(name, site, self.spec, layout, err, self.model) from err
        carry_over(site, new)
        new = append_after(new, after)
        new.train(site.training)
        self.replaced[f"{type(site).__name__} -> {type(new).__name__}"] += 1
        return new


def replace_norm_sites(model: nn.Module, spec: Any, layout: Optional[str] = None) -> tuple[nn.Module, SiteReport]:
    """Put ``spec`` at every norm site of ``model`` (in place); returns ``(model, report)``.

    Args:
        model: a built model (stock timm or any ``nn.Module``); a model that *is* a norm layer is replaced
            and returned, so use the returned model.
        spec: a norm spec in any form :func:`shared.specs.create_norm_factory` takes, or a factory
            ``factory(num_features, device=None, dtype=None)``.
        layout: None (each site's own layout, from its class) or a layout every site must have.

    Raises:
        SpecError: no norm site in the model; a site the spec does not fit (``gni16`` at a token
            LayerNorm), named with the spec to use instead; a 1d/3d norm site; a norm site with children
            other than timm's ``drop`` / ``act``.
    """
    before = census(model)
    builder = _SiteBuilder(model, spec, layout)
    model = replace_modules(model, builder)
    if not builder.replaced:
        raise SpecError(f"spec {_spec_text(spec)!r} matched no norm site in {type(model).__name__}: it has no "
                        f"BatchNorm, GroupNorm, LayerNorm or RmsNorm layer (norm sites found: "
                        f"{before['norm_sites'] or 'none'})")
    return model, SiteReport(_spec_text(spec), dict(builder.replaced), before, census(model))
