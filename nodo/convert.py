"""Model surgery: replace every BatchNorm layer of an existing model by another norm layer.

It also holds the one mechanism the harness uses to keep what follows a norm inside a norm site
(:func:`append_after`): timm's norm+activation layers (``BatchNormAct2d`` and friends) are a norm
layer with ``drop`` and ``act`` children applied after the normalization, and a replacement must keep
them, or the model silently loses its nonlinearities.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["convert", "ConvertReport", "append_after", "after_modules", "convert_sync_batchnorm"]

NormFactory = Callable[..., nn.Module]

# Tensors carried over from the old layer when the new one has a tensor of the same name and shape.
_CARRIED = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Children a norm+activation layer (timm's BatchNormAct2d, GroupNormAct, LayerNormAct...) applies after its
# normalization, in this order: x -> norm -> drop -> act. Any other child of a norm layer is unknown to us.
NORM_ACT_CHILDREN = ("drop", "act")


# ----------------------------------------------------------------------------------------------
# A norm layer followed by parameter-free modules, that still IS the norm layer
# ----------------------------------------------------------------------------------------------

class _ThenMixin:
    """Mixed into a norm class: ``forward(x) = after[-1](...after[0](norm(x)))``.

    The modules applied after the normalization are children named in ``_after_names`` (``noise``,
    ``drop``, ``act``...), so the layer keeps its own parameter and buffer names (``weight``,
    ``running_mean``...) and its type: pretrained weights of the plain norm layer load unchanged, and
    ``isinstance(layer, nn.LayerNorm)`` still holds.
    """

    _after_names: tuple = ()

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        for name in self._after_names:
            x = self._modules[name](x)
        return x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A composite of [norm, noise...] used to be an nn.Sequential whose norm was child "0"; read
        # "<site>.0.weight" of such older checkpoints as "<site>.weight".
        for name in list(self._parameters) + list(self._buffers):
            old = f"{prefix}0.{name}"
            if old in state_dict and f"{prefix}{name}" not in state_dict:
                state_dict[f"{prefix}{name}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        # the class is made at run time, so pickle could not find it by name: rebuild it from its base class
        return _rebuild_then, (type(self).__bases__[1], self.__dict__)


def _rebuild_then(base: type, state: dict) -> nn.Module:
    module = object.__new__(_then_class(base))
    module.__dict__.update(state)
    return module


@functools.lru_cache(maxsize=None)
def _then_class(cls: type) -> type:
    """``cls`` with :class:`_ThenMixin` in front, named ``<cls>Then`` (one class per norm class)."""
    return type(f"{cls.__name__}Then", (_ThenMixin, cls), {"__module__": cls.__module__})


def after_modules(norm: nn.Module) -> dict:
    """``{name: module}`` applied after the normalization inside ``norm``, in order.

    For a layer built by :func:`append_after` these are its appended children; for a timm
    norm+activation layer its ``drop`` and ``act`` children.
    """
    if isinstance(norm, _ThenMixin):
        return {name: norm._modules[name] for name in norm._after_names}
    return {name: norm._modules[name] for name in NORM_ACT_CHILDREN if norm._modules.get(name) is not None}


def append_after(norm: nn.Module, modules: dict) -> nn.Module:
    """Make ``norm`` apply ``modules`` (``{child name: module}``, in order) to its output; returns ``norm``.

    An ``nn.Sequential`` (a composite spec) gets them as further children. Any other layer gets them as
    children too and its class becomes ``<Class>Then`` (a subclass, so ``isinstance`` checks and the
    state-dict keys of its own parameters do not change). Parameter-free modules (noise, dropout,
    activations) keep pretrained weights loadable; a module with parameters adds keys under its name.
    """
    if not modules:
        return norm
    clash = [name for name in modules if name in norm._modules]
    if clash:
        raise ValueError(f"{type(norm).__name__} already has children {clash}; cannot append modules of those names")
    for name, module in modules.items():
        norm.add_module(name, module)
    if not isinstance(norm, nn.Sequential):
        if not isinstance(norm, _ThenMixin):
            norm.__class__ = _then_class(type(norm))
        norm._after_names = tuple(norm._after_names) + tuple(modules)
    return norm


# ----------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ConvertReport:
    """What :func:`convert` did: the replaced layers' names, and how many kept an activation/dropout."""
    replaced: list = dataclasses.field(default_factory=list)  # module names, as in named_modules()
    with_activation: int = 0  # replaced norm+activation layers whose drop/act children were kept

    def __str__(self) -> str:
        return (f"convert: replaced {len(self.replaced)} BatchNorm layers "
                f"({self.with_activation} of them norm+activation layers, activation kept)")


def _device_dtype(module: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    """Device and floating dtype of a BatchNorm layer's tensors (``None`` if it has none)."""
    for tensor in (module.weight, module.running_mean):
        if isinstance(tensor, Tensor):
            return tensor.device, tensor.dtype
    return None, None


@torch.no_grad()
def carry_over(old: nn.Module, new: nn.Module) -> None:
    """Copy ``weight``, ``bias`` and BN running statistics of ``old`` into ``new`` where names and shapes match."""
    for name in _CARRIED:
        source = getattr(old, name, None)
        target = getattr(new, name, None)
        if isinstance(source, Tensor) and isinstance(target, Tensor) and target.shape == source.shape:
            target.copy_(source)
            if isinstance(source, nn.Parameter) and isinstance(target, nn.Parameter):
                target.requires_grad_(source.requires_grad)


def detach_after(name: str, norm: nn.Module) -> dict:
    """The modules ``norm`` applies after normalizing (see :func:`after_modules`), to move to its replacement.

    Raises:
        ValueError: ``norm`` has other children, which we do not know how it applies; they are named.
    """
    after = after_modules(norm)
    unknown = [child for child in norm._modules if child not in after and norm._modules[child] is not None]
    if unknown:
        raise ValueError(
            f"convert: cannot replace {name or 'the root'} ({type(norm).__name__}): it has children {unknown} "
            f"that a replacement would drop; only norm+activation layers whose extra children are "
            f"{' / '.join(NORM_ACT_CHILDREN)} (applied in that order, as timm's BatchNormAct2d) are converted")
    return after


def replace_modules(root: nn.Module, replace: Callable[[str, nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Walk ``root`` and put ``replace(name, module)`` in place of each module for which it is not None.

    ``name`` is the module's name as in ``root.named_modules()`` ('' for the root). A replaced module's
    children are not visited. A module registered twice (shared) is replaced once and stays shared. Returns
    the (possibly new) root.
    """
    done: dict[int, nn.Module] = {}

    def visit(name: str, module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = replace(name, module)
        done[id(module)] = module if new is None else new
        if new is not None:
            return new
        # _modules rather than named_children(), which yields a child registered under two names once
        for child_name, child in list(module._modules.items()):
            if child is not None:
                new_child = visit(f"{name}.{child_name}" if name else child_name, child)
                if new_child is not child:
                    module.add_module(child_name, new_child)
        return module

    return visit("", root)


def convert(module: nn.Module, factory: NormFactory, *, return_report: bool = False):
    r"""Replace every BatchNorm layer in ``module`` (recursively) by ``factory(num_features, device=, dtype=)``.

    Every instance of ``torch.nn.modules.batchnorm._BatchNorm`` (``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``, timm's ``BatchNormAct2d``) is replaced by the module ``factory(num_features,
    device=device, dtype=dtype)`` builds on the old layer's device and dtype. The old layer's ``weight``,
    ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked`` are copied into the new
    one wherever it has a tensor of the same name and shape (a composite module may expose them as
    properties); anything else keeps the factory's initialization. The new layer takes the old
    one's train/eval mode.

    A norm+activation layer (timm's ``BatchNormAct2d``: ``act(drop(bn(x)))``) keeps its ``drop`` and
    ``act`` modules, the same objects, applied after the new layer (:func:`append_after`), so no
    activation is ever removed. A BatchNorm subclass with any other children is refused, naming them.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, children are replaced in place and the
    (possibly new) root module is returned, so a model that *is* a BatchNorm layer is handled too:
    always use the return value.

    Args:
        module: the model (any ``nn.Module``, including ``nn.Sequential`` and nested containers).
        factory: ``factory(num_features, device=None, dtype=None) -> nn.Module``, the contract of
            timm's ``norm_layer`` and of ``shared.specs.create_norm_factory``.
        return_report: also return a :class:`ConvertReport` (which layers were replaced).

    Returns:
        The converted model, or ``(model, report)`` with ``return_report=True``.

    Raises:
        ValueError: ``module`` has no BatchNorm layer (nothing to convert: most likely the wrong
            model, e.g. a LayerNorm transformer), a lazy BatchNorm, or a BatchNorm with unknown children.

    Example::

        >>> model = torchvision.models.resnet18()
        >>> model = nodo.convert(model, lambda c, **dd: nodo.GhostBatchNorm2d(c, ghost_batch_size=16, **dd))
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: module must be an nn.Module, got {type(module).__name__}")
    if not callable(factory):
        raise TypeError(f"convert: factory must be callable as factory(num_features, device=, dtype=), got {factory!r}")
    report = ConvertReport()

    def replace(name: str, old: nn.Module) -> Optional[nn.Module]:
        if not isinstance(old, _BatchNorm):
            return None
        if isinstance(old, LazyModuleMixin) and old.has_uninitialized_params():
            raise ValueError(f"convert: {name or 'the root'} ({old._get_name()}) is a lazy layer that has not seen an "
                             f"input yet, so its num_features is unknown; run one forward pass before converting")
        after = detach_after(name, old)
        device, dtype = _device_dtype(old)
        new = factory(old.num_features, device=device, dtype=dtype)
        if not isinstance(new, nn.Module):
            raise TypeError(f"convert: factory must return an nn.Module, got {type(new).__name__}")
        carry_over(old, new)
        new = append_after(new, after)
        new.train(old.training)
        report.replaced.append(name)
        report.with_activation += bool(after)
        return new

    converted = replace_modules(module, replace)
    if not report.replaced:
        norms = sorted({type(m).__name__ for m in module.modules() if "norm" in type(m).__name__.lower()})
        raise ValueError(f"convert: {type(module).__name__} has no BatchNorm layer to replace (norm layers found: "
                         f"{', '.join(norms) or 'none'}); convert only replaces BatchNorm layers")
    return (converted, report) if return_report else converted


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` that keeps what a BatchNorm applies after normalizing.

    torch's converter turns every BatchNorm into an ``nn.SyncBatchNorm`` and re-adds its children, which
    SyncBatchNorm's forward never calls: a timm ``BatchNormAct2d`` or a ``<Layer>Then`` of
    :func:`append_after` would silently lose its activation. Here each ``_BatchNorm`` becomes a SyncBatchNorm
    with the same hyperparameters, sharing its parameters and buffers (as torch's converter does), followed
    by the same ``drop`` / ``act`` / noise modules. Ghost norms (not ``_BatchNorm``) stay per process.
    """
    def replace(name: str, old: nn.Module) -> Optional[nn.Module]:
        if not isinstance(old, _BatchNorm) or isinstance(old, nn.SyncBatchNorm) and not after_modules(old):
            return None
        after = detach_after(name, old)
        new = nn.SyncBatchNorm(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats,
                               process_group)
        if old.affine:
            new.weight, new.bias = old.weight, old.bias
        new.running_mean, new.running_var = old.running_mean, old.running_var
        new.num_batches_tracked = old.num_batches_tracked
        new.train(old.training)
        return append_after(new, after)

    return replace_modules(module, replace)
