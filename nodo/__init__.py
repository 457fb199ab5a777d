"""nodo: ghost-noise and normalization layers for PyTorch (torch only).

The public API is this flat list; the math lives in :mod:`nodo.functional`.
"""
from nodo import functional

# ghost noise: the injector, the fused BN -> GNI layer and its analytic form
from nodo.ghost_noise import (
    GhostNoiseBatchNorm,
    GhostNoiseBatchNorm1d,
    GhostNoiseBatchNorm2d,
    GhostNoiseBatchNorm3d,
    GhostNoiseInjector,
    NoiseGenerator,
)
from nodo.noisy_affine import NoisyAffine

# batch norms (one family on GhostNormBase), dropout, weight standardization, affine, model surgery
from nodo.affine import Bias, Gain
from nodo.convert import convert
from nodo.dropout import FlexibleDropout
from nodo.exclusive_batch_norm import (
    ExclusiveBatchNorm,
    ExclusiveBatchNorm1d,
    ExclusiveBatchNorm2d,
    ExclusiveBatchNorm3d,
)
from nodo.ghost_batch_norm import (
    EvalNorm,
    EvalNorm1d,
    EvalNorm2d,
    EvalNorm3d,
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)
from nodo.norm_base import GhostNormBase, PartitionedBatchNorm
from nodo.weight_standardization import WSConv2d, WSLinear

# Batch Renormalization
from nodo.batch_renorm import BatchRenorm2d, set_total_steps

__version__ = "0.1.0"
