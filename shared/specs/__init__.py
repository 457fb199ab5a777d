"""Norm / noise specs: one parser from a spec (text or objects) to a module factory.

A *spec* says what to build at a model's norm site (or noise / dropout / conv site). Every form
below ends as the same validated list of parts, and :func:`create_norm_factory` turns it into a
factory with timm's norm-layer contract ``factory(num_features, device=None, dtype=None)``:

>>> create_norm_factory("gni16")(64)                 # short string (a preset)
GhostNoiseBatchNorm2d(64, ghost_batch_size=16, ...)
>>> create_norm_factory({"subtype": "gbn2d", "ghost_batch_size": 16})(64)      # mapping
>>> create_norm_factory(["ln", {"subtype": "gnir", "ghost_batch_size": 12}], layout="channels_last")(512)
>>> create_norm_factory('[{"type":"norm","subtype":"bn2d","dkwargs":{"affine":False}},'
...                     '{"type":"noise","subtype":"ghost_noise_injector_rep","dkwargs":{"batch_size":16}},'
...                     '{"type":"gain","subtype":"standard"},{"type":"bias","subtype":"standard"}]')(64)

Forms
-----
* **Short string** ``name[N][-shift|-scale]``: a part name (table below) with its number argument
  (``gbn16``, ``gn32``, ``gnir16-shift``) or a preset: ``gniN`` = BN(affine=False) -> GNI(N) -> gain
  -> bias (the paper's placement, built as the fused :class:`nodo.GhostNoiseBatchNorm2d`) and ``natN`` =
  BN(affine=False) -> NoisyAffine(N) -> gain -> bias. ``-shift`` / ``-scale`` keep only that noise.
  ``none`` / ``identity`` build ``nn.Identity``. Any other name timm's ``get_norm_layer`` knows
  (``rmsnorm2d``, ``layernorm2d``...) is accepted too.
* **Mapping** ``{type?, subtype, kwargs...}``: one part. Keyword arguments may be flat or in the reference
  implementation's ``dkwargs`` / ``okwargs``; ``type`` picks the table (else the site's default table).
* **List** of short strings and mappings: the parts in order (a preset in a list adds its parts).
* **Text**: JSON, Python literal (``True``/``False``, as in the paper's launch scripts) or YAML of any of
  the above.

Part tables (canonical name first, then aliases; ``N`` = the short string's number argument)::

    norm   bn2d (bn, batchnorm, batchnorm2d)        nn.BatchNorm2d
           gbn2d (gbn)        N=ghost_batch_size    nodo.GhostBatchNorm2d
           en2d (ebn, en)     N=ghost_batch_size    nodo.EvalNorm2d
           xbn2d (xbn)        N=ghost_batch_size    nodo.ExclusiveBatchNorm2d
           gnbn2d             N=ghost_batch_size    nodo.GhostNoiseBatchNorm2d (fused BN -> GNI -> affine)
           gn (groupnorm)     N=num_groups          nn.GroupNorm (num_groups or channels_per_group)
           ln (layernorm)                           timm LayerNorm (channels_last) / LayerNorm2d (channels_first)
           frn                                      timm FilterResponseNormTlu2d (FRN + TLU)
           identity (none)                          nn.Identity
    noise  gnir (ghost_noise_injector_rep, ghost_noise)  N=ghost_batch_size  nodo.GhostNoiseInjector
           nat (noisy_affine) N=ghost_batch_size    nodo.NoisyAffine
           dropout                                  nn.Dropout
           flexible_dropout                         nodo.FlexibleDropout
    gain   gain (standard)                          nodo.Gain        bias  bias (standard)  nodo.Bias
    activation  relu, leaky_relu, gelu, silu, or any name of timm's get_act_layer
    conv   conv2d (standard), wsconv2d (ws)         linear  linear (standard), wslinear (ws)

The reference implementation's keyword names are accepted and renamed: ``batch_size`` ->
``ghost_batch_size``, ``shift_noise``/``scale_noise`` -> ``shift``/``scale``, ``channel_last`` ->
``channel_dim`` (True -> -1), ``G``/``CpG`` -> ``num_groups``/``channels_per_group``,
``drop_probability``/``noise_type`` -> ``p``/``kind``. Reference options we do not implement are
errors unless they hold the only value we implement (``scale_shift=False``, ``scaling_type="mean"``).

Note that short strings name presets while mappings name single parts: ``"nat8"`` is the composite
BN -> NoisyAffine -> gain -> bias, ``{"subtype": "nat", "ghost_batch_size": 8}`` is NoisyAffine alone
(the reference's meaning of ``nat``).

Strictness: an unknown name or keyword is a :class:`SpecError` naming it and suggesting the closest
valid ones; the keywords are checked against the target constructor's signature.

Layouts: ``layout="channels_first"`` (default; ``(N, C, *)`` activations, every CNN norm site) or
``"channels_last"`` (``(N, *, C)`` tokens, e.g. a ViT's LayerNorm sites). The layout sets the default
``channel_dim`` of noise / gain / bias parts (1 or -1), picks LayerNorm2d vs LayerNorm for ``ln``, and
rejects parts that need ``(N, C, H, W)`` input (the BatchNorm family, GroupNorm, FRN) at token sites.
"""
from shared.specs._build import (
    NormSequence,
    attach_noise_generator,
    create_conv_factory,
    create_linear_factory,
    create_noise_factory,
    create_norm_factory,
    rename_reference_kwargs,
)
from shared.specs._parse import parse_spec
from shared.specs._table import KINDS, LAYOUTS, NormSpec, PartSpec, SpecError

__all__ = [
    "SpecError",
    "PartSpec",
    "NormSpec",
    "NormSequence",
    "parse_spec",
    "create_norm_factory",
    "create_noise_factory",
    "create_conv_factory",
    "create_linear_factory",
    "attach_noise_generator",
    "rename_reference_kwargs",
    "KINDS",
    "LAYOUTS",
]
