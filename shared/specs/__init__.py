"""Norm / noise specs: one parser from a spec (text or objects) to a module factory.

A *spec* says what to build at a model's norm site (or noise, dropout, conv site). Every form below
becomes the same validated list of parts (:func:`parse_spec`), and :func:`create_norm_factory` turns
it into a factory with timm's norm-layer contract ``factory(num_features, device=None, dtype=None)``:

>>> create_norm_factory("gni16")(64)                                   # short string (a preset)
GhostNoiseBatchNorm2d(64, eps=1e-05, ..., ghost_batch_size=16, noise_eps=0.001, shift=True, scale=True, ...)
>>> create_norm_factory({"subtype": "gbn2d", "ghost_batch_size": 16})(64)                   # mapping
>>> create_norm_factory(["ln", "gnir12"], layout="channels_last")(512)                      # list
>>> create_norm_factory('[{"type":"norm","subtype":"bn2d","dkwargs":{"affine":False}},'    # reference JSON
...                     '{"type":"noise","subtype":"ghost_noise_injector_rep","dkwargs":{"batch_size":16}},'
...                     '{"type":"gain","subtype":"standard"},{"type":"bias","subtype":"standard"}]')(64)

Forms
-----
* **Short string** ``name[N][-shift|-scale]``: a part name (table below) with its number argument
  (``gbn16``, ``gn32``, ``gnir16-shift``) or a preset: ``gniN`` = BN(affine=False) -> GNI(N) -> gain
  -> bias (the paper's placement) and ``natN`` = BN(affine=False) -> NoisyAffine(N) -> gain -> bias.
  ``-shift`` / ``-scale`` keep only that noise. ``none`` builds ``nn.Identity``. Any other name timm's
  ``get_norm_layer`` knows (``rmsnorm2d``, ``layernorm2d``...) or, in a list, ``get_act_layer`` knows
  (``relu``...) is accepted too.
* **Mapping** ``{type?, subtype, kwargs...}``: one part. Keywords may be flat or in the reference
  implementation's ``dkwargs`` / ``okwargs``; ``type`` picks the table (else the site's tables are
  searched; ``standard`` then needs a type).
* **List** of short strings and mappings: the parts in order (a preset adds its parts).
* **Text** of any of the above: Python literal (``True``/``False``, as the paper's launch scripts
  write), JSON, or YAML (``1e-3`` reads as a float).

Part tables (canonical name first, then aliases; ``N`` = the short string's number)::

    norm   bn2d (bn, batchnorm, batchnorm2d)        nn.BatchNorm2d
           gbn2d (gbn)        N=ghost_batch_size    nodo.GhostBatchNorm2d
           en2d (ebn, en)     N=ghost_batch_size    nodo.EvalNorm2d
           xbn2d (xbn)        N=ghost_batch_size    nodo.ExclusiveBatchNorm2d
           gnbn2d             N=ghost_batch_size    nodo.GhostNoiseBatchNorm2d (fused BN -> GNI -> gain, bias)
           gn (groupnorm)     N=num_groups          nn.GroupNorm (num_groups or channels_per_group)
           ln (layernorm)                           LayerNorm over channels, eps 1e-5 (timm LayerNorm2d / LayerNorm)
           frn                                      timm FilterResponseNormTlu2d (FRN + TLU)
           identity (none)                          nn.Identity
    noise  gnir (ghost_noise_injector_rep, ghost_noise)  N=ghost_batch_size  nodo.GhostNoiseInjector
           nat (noisy_affine) N=ghost_batch_size    nodo.NoisyAffine
           dropout                                  nn.Dropout
           flexible_dropout                         nodo.FlexibleDropout
    gain   gain (standard)    nodo.Gain             bias   bias (standard)   nodo.Bias
    activation  relu, leaky_relu, gelu, silu (swish), or a name of timm's get_act_layer
    conv   conv2d (standard); ws (ws_init)          nodo.WSConv2d, scaling "init" (keeps the init scale)
           wsconv2d (ws_fan_in)                     nodo.WSConv2d, scaling "fan_in" (the reference's)
    linear linear (standard); ws (ws_init), wslinear (ws_fan_in): as for conv, nodo.WSLinear

The reference's GNI composite ``[bn2d(affine=False), gnir(N), gain, bias]`` (also what ``gniN``
expands to) is built as the fused ``nodo.GhostNoiseBatchNorm2d`` at channels_first sites: the same
computation and the same ghost-index draws in fewer passes (tests check equal outputs). A norm followed
only by parameter-free parts (``[ln, gnir12]``) is built as that norm with the parts as children applied
after it (``LayerNormThen``, an ``nn.LayerNorm``; :func:`nodo.convert.append_after`), so its state-dict keys
are the plain norm's and pretrained weights load. Any other composite builds a :class:`NormSequence`
whose ``.weight`` / ``.bias`` are those of its gain / bias part, so timm's ``zero_init_last``
zero-initializes it.

Norm sites of timm models
-------------------------
The factory also takes timm's norm+activation keywords (``act_layer``, ``apply_act``, ``act_kwargs``,
``inplace``, ``drop_layer``): timm models that build ``BatchNormAct2d``-style layers from ``norm_layer``
(efficientnet, regnet, resnetv2) then get the spec followed by the same ``drop`` and ``act`` modules.
:func:`replace_norm_sites` (``shared/specs/sites.py``) puts a spec at every norm site of a built model,
each with its own layout, eps and activation, and returns a :class:`SiteReport`; ``shared.create_model``
uses it for stock timm models.

Porting the reference implementation's specs
--------------------------------------------
Its keyword names are renamed: ``batch_size`` -> ``ghost_batch_size``, ``shift_noise`` /
``scale_noise`` -> ``shift`` / ``scale``, ``channel_last`` -> ``channel_dim`` (True -> -1), ``G`` /
``CpG`` -> ``num_groups`` / ``channels_per_group``, ``drop_probability`` / ``noise_type`` -> ``p`` /
``kind``. Options we do not implement are errors unless they hold the only value we implement
(``scale_shift=False``, ``scaling_type="mean"``, ``max_steps=inf``). Differences that remain:

* short strings name presets, mappings name single parts: ``"nat8"`` is the composite, while
  ``{"subtype": "nat", "ghost_batch_size": 8}`` is NoisyAffine alone (the reference's ``nat``);
* the reference's older shuffle-based ``gni`` noise is ``{"subtype": "gnir", "sampling": "shuffle"}``;
* the reference's names select its semantics where nodo's standard differs: ``noise_type: gaussian``
  is ``kind="gaussian_reference"`` (std p/(1-p); nodo's ``kind="gaussian"`` is variance-matched,
  std sqrt(p/(1-p))), and ``wsconv2d`` / ``wslinear`` are ``WSConv2d(scaling="fan_in")`` (nodo's
  ``ws`` keeps the init scale); see docs/DIFFERENCES.md.

Strictness and layouts
----------------------
An unknown name or keyword is a :class:`SpecError` naming it and suggesting the closest valid ones;
keywords are checked against the target constructor's signature, so nothing is silently dropped.
``layout="channels_first"`` (default: ``(N, C, *)`` activations, CNN norm sites) or
``"channels_last"`` (``(N, *, C)`` tokens, e.g. ViT LayerNorm sites; a model passes the layout of
its own norm sites) sets the default ``channel_dim`` of noise / gain / bias / dropout parts (1 or
-1), picks LayerNorm2d or LayerNorm for ``ln``, and rejects parts that need ``(N, C, H, W)`` input
(the BatchNorm family, GroupNorm, FRN) at token sites.
"""
from shared.specs._build import (
    NormSequence, attach_noise_generator, create_conv_factory, create_linear_factory,
    create_noise_factory, create_norm_factory,
)
from shared.specs._parse import parse_spec
from shared.specs._table import KINDS, LAYOUTS, NormSpec, PartSpec, SpecError
from shared.specs.sites import SiteReport, census, replace_norm_sites

__all__ = [
    "SpecError", "PartSpec", "NormSpec", "NormSequence", "parse_spec",
    "create_norm_factory", "create_noise_factory", "create_conv_factory", "create_linear_factory",
    "attach_noise_generator", "KINDS", "LAYOUTS",
    "SiteReport", "census", "replace_norm_sites",
]
