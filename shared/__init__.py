"""ghost-noise harness: a timm plugin (models, norm/noise specs) plus training, data and reporting tools.

``import shared`` registers this project's models into stock timm (timm's ``@register_model``), so
``timm.create_model("cifar_resnet18", norm="gni16")`` works afterwards; :func:`register` does the same
explicitly and may be called any number of times. Importing this package loads torch, timm and nodo
only: training, data, wandb and plotting modules are imported where they are used.
"""
from __future__ import annotations

__all__ = ["register", "create_model", "create_norm_factory", "attach_noise_generator", "SpecError"]


def register() -> tuple:
    """Register the project's models with timm (idempotent: a Python module registers once).

    Returns:
        The registered model names.
    """
    from shared import models

    return models.MODEL_NAMES


from shared.models import create_model  # noqa: E402  (registers the models, as timm's own model modules do)
from shared.specs import SpecError, attach_noise_generator, create_norm_factory  # noqa: E402
