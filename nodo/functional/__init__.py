"""Functional core of nodo: every layer's math as a pure function (no parameters, no buffers).

Modules in :mod:`nodo` are thin wrappers that hold parameters, buffers and a random generator
and call these functions.
"""
# --- ghost noise (owner: ghost-noise engineer)

# --- batch norms, dropout, weight standardization (owner: batch-norm engineer)
from nodo.functional.batch_norm import eval_norm, exclusive_batch_norm, ghost_batch_norm, ghost_batch_partition
from nodo.functional.dropout import flexible_dropout, gaussian_dropout_std
from nodo.functional.weight_standardization import standardize_weight, weight_std
