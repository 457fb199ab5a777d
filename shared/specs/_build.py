"""Validated parts -> modules and factories; the noise generator; reference model keywords."""
from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn
from timm.layers import create_act_layer, create_norm_act

import nodo
from nodo.convert import NORM_ACT_CHILDREN, append_after
from shared.specs._parse import parse_spec
from shared.specs._table import (
    CHANNELS_FIRST, TABLE, TAKES_FEATURES, NormSpec, PartSpec, SpecError, accepted_arguments, make_part,
    parameters_of, row_of,
)

# ----------------------------------------------------------------------------------------------
# Validated parts -> modules
# ----------------------------------------------------------------------------------------------

class NormSequence(nn.Sequential):
    """The module of a composite spec: its parts in order (children ``0``, ``1``... as in nn.Sequential).

    It exposes ``.weight`` / ``.bias``: the ``weight`` / ``bias`` of its last part that has one (the gain /
    bias part of the GNI spec), so model code that treats a norm layer as having an affine weight, such
    as timm's ``zero_init_last`` (``nn.init.zeros_(self.bn2.weight)``), acts on the composite too. They are
    ``None`` when no part has one, like ``BatchNorm2d(affine=False)``.
    """

    def _last_parameter(self, name: str) -> Optional[nn.Parameter]:
        # the drop / act children of a norm+act site are not the norm's (a PReLU activation has a weight)
        for child, module in reversed(list(self._modules.items())):
            if child in NORM_ACT_CHILDREN:
                continue
            value = getattr(module, name, None)
            if isinstance(value, torch.Tensor):
                return value
        return None

    @property
    def weight(self) -> Optional[nn.Parameter]:
        return self._last_parameter("weight")

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self._last_parameter("bias")


def _fuse_gni(parts: tuple, layout: str) -> tuple:
    """``parts``, or the reference's GNI composite ``[bn2d(affine=False), gnir(...), gain, bias]`` at a
    channels_first site as one fused part.

    nodo.GhostNoiseBatchNorm2d computes exactly BN(affine=False) -> GhostNoiseInjector -> Gain -> Bias
    (the same statistics, the same ghost-index draws from the generator, then the per-channel affine), in
    fewer passes over the activation. Returns ``parts`` unchanged if they are anything else (other norm, extra
    keywords the fused layer does not have, a channels_last noise part...).
    """
    gni = [("norm", "bn2d"), ("noise", "gnir"), ("gain", "gain"), ("bias", "bias")]
    if layout != CHANNELS_FIRST or [(p.kind, p.subtype) for p in parts] != gni:
        return parts
    norm, noise, gain, bias = (p.options for p in parts)
    if (norm.pop("affine", True) is not False or any(p.options.get("channel_dim", 1) != 1 for p in parts[1:])
            or (set(gain) | set(bias)) - {"channel_dim"}):
        return parts
    # the fused layer's own eps is the norm's: the noise's eps is its noise_eps
    fused = {**norm, **{"noise_eps" if key == "eps" else key: value for key, value in noise.items()}}
    fused.pop("channel_dim", None)
    accepted, _ = accepted_arguments(TABLE["norm"]["gnbn2d"])
    return (make_part("norm", "gnbn2d", **fused),) if set(fused) <= set(accepted) else parts


def _build_part(part: PartSpec, num_features: int, layout: str, device, dtype, site_kwargs: dict) -> nn.Module:
    row = row_of(part)
    names = {p.name for p in parameters_of(row)}
    site_args = dict(device=device, dtype=dtype, layout=layout, channel_dim=1 if layout == CHANNELS_FIRST else -1)
    # the spec's keywords (a channel_dim it sets) and the model's override the site's defaults
    kwargs = {**{k: v for k, v in site_args.items() if k in names}, **part.options, **site_kwargs}
    args = (num_features,) if part.kind in TAKES_FEATURES else ()
    try:
        return row.target(*args, **kwargs)
    except SpecError:
        raise
    except (TypeError, ValueError) as err:
        raise SpecError(f"building '{part}' for num_features={num_features}: {err}") from err


# Keywords timm passes to a norm+activation layer (BatchNormAct2d's signature) beyond the norm's own.
_NORM_ACT_KWARGS = ("act_layer", "apply_act", "act_kwargs", "inplace", "drop_layer")
_AFTER_NAMES = {"noise": "noise", "activation": "act"}  # child names of the parts appended to a norm


def _norm_act_children(act_layer=None, apply_act: bool = True, act_kwargs: Optional[dict] = None,
                       inplace: bool = True, drop_layer=None) -> dict:
    """``{"drop": ..., "act": ...}`` as timm's BatchNormAct2d builds them (same defaults, ``inplace`` into act_kwargs).

    ``act_layer=None`` or ``apply_act=False`` gives an ``nn.Identity`` activation, as in timm.
    """
    act_kwargs = {"inplace": inplace, **(act_kwargs or {})}  # a copy: timm's setdefault mutates the caller's dict
    act = create_act_layer(act_layer, **act_kwargs) if apply_act else None
    drop = drop_layer() if drop_layer is not None else nn.Identity()
    return {"drop": drop, "act": act if act is not None else nn.Identity()}


def first_tensor(module: nn.Module) -> Optional[torch.Tensor]:
    """The first parameter of ``module``, else its first buffer, else None."""
    return next(itertools.chain(module.parameters(), module.buffers()), None)


def _assemble(modules: list, parts: tuple) -> nn.Module:
    """One module for a site: a norm followed by parameter-free parts stays that norm (their children appended,
    so its state-dict keys are the plain norm's: ``[ln, gnir12]`` loads LayerNorm weights); anything else is a
    :class:`NormSequence`."""
    if len(modules) == 1:
        return modules[0]
    if parts[0].kind == "norm" and all(first_tensor(m) is None for m in modules[1:]):
        names: dict = {}
        for module, part in zip(modules[1:], parts[1:]):
            base = _AFTER_NAMES.get(part.kind, part.kind)
            name = base if base not in names else f"{base}{sum(n.startswith(base) for n in names)}"
            names[name] = module
        return append_after(modules[0], names)
    return NormSequence(*modules)


def _build_site_module(num_features: int, device=None, dtype=None, *, spec: NormSpec, **site_kwargs) -> nn.Module:
    """The factory body: build ``spec`` for a site with ``num_features`` channels.

    ``site_kwargs`` are keywords a model passes to its norm layer beyond the channel count: timm's
    ``norm_layer(C, eps=1e-6)`` in a few architectures goes to the spec's normalization part, overriding
    the spec (an error if it does not take them); timm's norm+activation keywords (``act_layer``,
    ``apply_act``, ``act_kwargs``, ``inplace``, ``drop_layer``, passed where a model builds
    ``BatchNormAct2d``-style layers) make the site ``act(drop(spec(x)))`` with ``drop`` / ``act`` children
    built exactly as timm's BatchNormAct2d builds them.
    """
    norm_act = {k: site_kwargs.pop(k) for k in _NORM_ACT_KWARGS if k in site_kwargs}
    if norm_act and "act_layer" not in norm_act:
        raise SpecError(f"spec {spec}: the model called its norm layer as a norm+activation layer "
                        f"({', '.join(sorted(norm_act))}) without an act_layer, so the activation is unknown; "
                        f"timm's get_norm_act_layer passes it for factories from shared.specs (is shared imported?)")
    parts = _fuse_gni(spec.parts, spec.layout)
    norm_index = next((i for i, p in enumerate(parts) if p.kind == "norm"), None)
    if norm_index is not None and parts[norm_index].subtype == "identity":
        site_kwargs = {}  # no normalization: nothing to pass an eps or momentum to
    if site_kwargs:
        accepted, _ = accepted_arguments(row_of(parts[norm_index])) if norm_index is not None else ({}, False)
        unknown = sorted(set(site_kwargs) - set(accepted))
        if unknown:
            raise SpecError(f"the model passes {', '.join(f'{k}={site_kwargs[k]!r}' for k in unknown)} to its norm "
                            f"layer, but spec {spec} has no normalization part that takes it")
    modules = [_build_part(p, num_features, spec.layout, device, dtype, site_kwargs if i == norm_index else {})
               for i, p in enumerate(parts)]
    module = _assemble(modules, parts)
    if norm_act:
        module = append_after(module, _norm_act_children(**norm_act))
    return module


# Make timm's ``get_norm_act_layer`` pass ``act_layer`` to our factories. timm (1.0.x) passes a model's activation
# to a norm+act factory only if the factory's class or function is in its ``_NORM_ACT_REQUIRES_ARG`` set; for any
# other function it drops the activation, and the model would silently lose it (efficientnet, regnet, resnetv2,
# mobilenetv3 build their norm+act layers so). If a timm version lacks that set, :func:`_build_site_module`
# refuses such calls instead of dropping the act.
if isinstance(getattr(create_norm_act, "_NORM_ACT_REQUIRES_ARG", None), set):
    create_norm_act._NORM_ACT_REQUIRES_ARG.add(_build_site_module)


def _is_factory(spec: Any) -> bool:
    """An existing factory (a class, function or partial): used as is."""
    return callable(spec) and not isinstance(spec, (str, Mapping))


def _as_factory(spec: Any, site: str, layout: str) -> Callable[..., nn.Module]:
    if _is_factory(spec):
        return spec
    # A partial of a module-level function (not a closure) so that timm's get_norm_layer accepts it
    # (it asserts type/str/function/partial) and the factory can be pickled.
    return functools.partial(_build_site_module, spec=parse_spec(spec, site, layout))


def create_norm_factory(spec: Any, layout: str = CHANNELS_FIRST) -> Callable[..., nn.Module]:
    """Turn a norm spec into ``factory(num_features, device=None, dtype=None) -> nn.Module``.

    Args:
        spec: a short string, mapping, list of parts, JSON/Python/YAML text of those (see the module
            docstring), or an existing factory (any callable other than a str/mapping, returned as is).
        layout: 'channels_first' for ``(N, C, *)`` activations (CNN norm sites) or 'channels_last' for
            ``(N, *, C)`` tokens (ViT LayerNorm sites): sets the default ``channel_dim`` of noise, gain and
            bias parts and the LayerNorm flavour, and rejects norms that need NCHW input.

    Returns:
        A ``functools.partial`` whose ``keywords['spec']`` is the parsed :class:`NormSpec`. The GNI
        composite at a channels_first site builds the fused ``nodo.GhostNoiseBatchNorm2d``; a norm
        followed by parameter-free parts builds that norm with them as children (same state-dict keys);
        other composites build a :class:`NormSequence`. Called with timm's norm+activation keywords
        (``act_layer``...) it appends ``drop`` and ``act`` as timm's ``BatchNormAct2d`` builds them.

    Raises:
        SpecError: the spec is malformed or names an unknown part or keyword (with close matches).
    """
    return _as_factory(spec, "norm", layout)


def create_noise_factory(spec: Any, layout: str = CHANNELS_FIRST) -> Callable[..., nn.Module]:
    """Like :func:`create_norm_factory` for a site that takes noise but no normalization.

    Used for NF-ResNet's pre-activation noise and residual-block dropout; ``gnir32`` or
    ``{"subtype": "flexible_dropout", "p": 0.1}`` fit, ``gni32`` (which contains a BatchNorm) does not.
    """
    return _as_factory(spec, "noise", layout)


def _layer_factory(spec: Any, site: str) -> Callable[..., nn.Module]:
    if _is_factory(spec):
        return spec
    parsed = parse_spec(spec, site)
    if len(parsed.parts) != 1:
        raise SpecError(f"a {site} spec names one layer, got {len(parsed.parts)} parts: {parsed}")
    part = parsed.parts[0]
    return functools.partial(row_of(part).target, **part.options)


def create_conv_factory(spec: Any) -> Callable[..., nn.Module]:
    """``'standard'`` / ``'ws'`` / ``{"subtype": "wsconv2d", "dkwargs": {"gain": True}}`` -> a Conv2d class.

    Returns a ``functools.partial`` of ``nn.Conv2d`` or ``nodo.WSConv2d`` with the spec's keywords bound,
    called like ``nn.Conv2d(in_channels, out_channels, kernel_size, ...)``.
    """
    return _layer_factory(spec, "conv")


def create_linear_factory(spec: Any) -> Callable[..., nn.Module]:
    """``'standard'`` / ``'ws'`` -> a partial of ``nn.Linear`` or ``nodo.WSLinear``."""
    return _layer_factory(spec, "linear")


# ----------------------------------------------------------------------------------------------
# Noise generator
# ----------------------------------------------------------------------------------------------

# nodo.NoiseGenerator: the counter-based generator nodo's ghost-noise layers also accept (compiles without
# graph breaks). One generator must serve every noise layer and FlexibleDropout takes torch.Generator only,
# so a torch.Generator is what we attach; an existing NoiseGenerator is replaced like any generator.
_GENERATOR_TYPES = (torch.Generator, nodo.NoiseGenerator)


def attach_noise_generator(model: nn.Module, seed: int, device: Union[str, torch.device, None] = None
                           ) -> torch.Generator:
    """Give every noise module of ``model`` one dedicated ``torch.Generator`` seeded with ``seed``.

    Every submodule whose ``generator`` attribute is None or a generator (nodo's GhostNoiseInjector,
    GhostNoiseBatchNorm2d, NoisyAffine, FlexibleDropout) gets the same ``torch.Generator`` object. The
    noise then no longer draws from torch's global RNG, so a GNI run sees the same data order,
    augmentation and initialization as the BN run with the same seed, and the noise itself is
    reproducible from ``seed``. Checkpoint the returned
    generator's ``get_state()`` to resume the noise stream exactly.

    Args:
        model: the model (a DDP / EMA wrapper works too: ``modules()`` reaches the wrapped model).
        seed: seed of the generator. Under DistributedDataParallel give each rank its own seed (e.g.
            ``seed + rank``) so the ranks do not draw identical ghost batches.
        device: device of the generator; it must be the device the noise is sampled on, the model's.
            Default: the device of the model's first parameter or buffer, else CPU.

    Returns:
        The generator (also reachable as ``module.generator`` on each noise module).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r} of type {type(seed).__name__}")
    if device is None:
        tensor = first_tensor(model)
        device = tensor.device if tensor is not None else torch.device("cpu")
    generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    for module in model.modules():
        # noise layers keep ``generator`` as None or a generator; anything else called "generator" (a
        # GAN's submodule...) is not ours to replace
        current = getattr(module, "generator", False)
        if current is None or isinstance(current, _GENERATOR_TYPES):
            module.generator = generator
    return generator
