"""nodo: ghost-noise and normalization layers for PyTorch (torch only).

The public API is this flat list; the math lives in :mod:`nodo.functional`.
"""
from nodo import functional

# --- ghost noise: GhostNoiseInjector, GhostNoiseBatchNorm2d, NoisyAffine (owner: ghost-noise engineer)

# --- batch norms and the rest: GhostBatchNorm2d, ExclusiveBatchNorm2d, EvalNorm2d, FlexibleDropout,
# --- WSConv2d, WSLinear, Gain, Bias, convert (owner: batch-norm engineer)

__version__ = "0.1.0"
