"""Functional core of nodo: every layer's math as a pure function (no parameters, no buffers).

Modules in :mod:`nodo` are thin wrappers that hold parameters, buffers and a random generator
and call these functions.
"""
# --- ghost noise (owner: ghost-noise engineer)
from nodo.functional.ghost_noise import (
    NoiseGenerator,
    ghost_batch_weights,
    ghost_noise_batch_norm,
    ghost_noise_from_moments,
    ghost_noise_injection,
    sample_ghost_indices,
    sample_moments,
)
from nodo.functional.noisy_affine import noisy_affine, sample_noisy_affine_noise

# --- batch norms, dropout, weight standardization (owner: batch-norm engineer)
from nodo.functional.batch_norm import eval_norm, exclusive_batch_norm, ghost_batch_norm, ghost_batch_partition
from nodo.functional.dropout import flexible_dropout, gaussian_dropout_std
from nodo.functional.weight_standardization import fan_in_standardize_weight, standardize_weight, weight_std

# --- Batch Renormalization (owner: paper-fidelity engineer)
from nodo.functional.batch_renormalization import batch_renorm, renorm_limits
