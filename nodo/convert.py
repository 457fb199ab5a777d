"""Model surgery: replace every BatchNorm layer of an existing model by another norm layer."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["convert"]

NormFactory = Callable[..., nn.Module]

# Tensors carried over from the old layer when the new one has a tensor of the same name and shape.
_CARRIED = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _device_dtype(module: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    """Device and floating dtype of a BatchNorm layer's tensors (``None`` if it has none)."""
    for tensor in (module.weight, module.running_mean):
        if isinstance(tensor, Tensor):
            return tensor.device, tensor.dtype
    return None, None


@torch.no_grad()
def _carry_over(old: nn.Module, new: nn.Module) -> None:
    for name in _CARRIED:
        source = getattr(old, name, None)
        target = getattr(new, name, None)
        if isinstance(source, Tensor) and isinstance(target, Tensor) and target.shape == source.shape:
            target.copy_(source)
            if isinstance(source, nn.Parameter) and isinstance(target, nn.Parameter):
                target.requires_grad_(source.requires_grad)


def convert(module: nn.Module, factory: NormFactory) -> nn.Module:
    r"""Replace every BatchNorm layer in ``module`` (recursively) by ``factory(num_features, device=, dtype=)``.

    Every instance of ``torch.nn.modules.batchnorm._BatchNorm`` (``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``) is replaced by the module ``factory(num_features, device=device,
    dtype=dtype)`` builds on the old layer's device and dtype. The old layer's ``weight``,
    ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked`` are copied into the new
    one wherever it has a tensor of the same name and shape (a composite module may expose them as
    properties); anything else keeps the factory's initialization. The new layer takes the old
    one's train/eval mode.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, children are replaced in place and the
    (possibly new) root module is returned, so a model that *is* a BatchNorm layer is handled too:
    always use the return value.

    Args:
        module: the model (any ``nn.Module``, including ``nn.Sequential`` and nested containers).
        factory: ``factory(num_features, device=None, dtype=None) -> nn.Module``, the contract of
            timm's ``norm_layer`` and of ``shared.specs.create_norm_factory``.

    Returns:
        The converted model.

    Example::

        >>> model = torchvision.models.resnet18()
        >>> model = nodo.convert(model, lambda c, **dd: nodo.GhostBatchNorm2d(c, ghost_batch_size=16, **dd))
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: module must be an nn.Module, got {type(module).__name__}")
    if not callable(factory):
        raise TypeError(f"convert: factory must be callable as factory(num_features, device=, dtype=), got {factory!r}")
    return _convert(module, factory, {})


def _convert(module: nn.Module, factory: NormFactory, done: dict[int, nn.Module]) -> nn.Module:
    # `done` maps id(old layer) -> new layer, so a BatchNorm shared by two parents stays shared.
    if id(module) in done:
        return done[id(module)]
    converted = module
    if isinstance(module, _BatchNorm):
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(
                f"convert: {module._get_name()} is a lazy layer that has not seen an input yet, so its "
                f"num_features is unknown; run one forward pass before converting"
            )
        device, dtype = _device_dtype(module)
        converted = factory(module.num_features, device=device, dtype=dtype)
        if not isinstance(converted, nn.Module):
            raise TypeError(f"convert: factory must return an nn.Module, got {type(converted).__name__}")
        _carry_over(module, converted)
        converted.train(module.training)
        done[id(module)] = converted
        return converted
    done[id(module)] = module
    # _modules rather than named_children(), which yields a child registered under two names once.
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new_child = _convert(child, factory, done)
        if new_child is not child:
            module.add_module(name, new_child)
    return converted
