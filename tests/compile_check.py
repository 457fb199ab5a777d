"""One check shared by the noise layers' tests: a model compiles whole and matches eager, step after step."""
from __future__ import annotations

from typing import Callable

import torch
import torch._dynamo as dynamo


def assert_compiles_like_eager(build: Callable[[], torch.nn.Module], x: torch.Tensor, *, atol: float,
                               rtol: float, steps: int = 3) -> tuple:
    """``build()`` twice (each with its own, equally seeded noise generator): one eager, one compiled.

    Asserts one graph without breaks, then ``steps`` forward+backward steps with the same outputs as
    eager mode (same noise) and no recompilation at the fixed input shape. Returns ``(eager, compiled)``
    after those steps, for checks of their buffers and gradients.
    """
    dynamo.reset()
    explanation = dynamo.explain(build())(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager, compiled = build(), build()
    compiled.load_state_dict(eager.state_dict())
    compiled_fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    with dynamo.config.patch(error_on_recompile=True):
        for _ in range(steps):
            expected, got = eager(x), compiled_fn(x)
            torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
            expected.square().sum().backward()
            got.square().sum().backward()
    dynamo.reset()
    return eager, compiled
