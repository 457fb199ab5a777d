"""Functional core of nodo: every layer's math as a pure function (no parameters, no buffers).

Modules in :mod:`nodo` are thin wrappers that hold parameters, buffers and a random generator
and call these functions.
"""
# --- ghost noise (owner: ghost-noise engineer)

# --- batch norms, dropout, weight standardization (owner: batch-norm engineer)
