"""The README's code example runs as printed."""
import re
from pathlib import Path

import torch


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    x = torch.randn(8, 3, 16, 16)
    assert namespace["model"](x).shape == (8, 64, 16, 16)
    assert namespace["resnet"](torch.randn(4, 3, 32, 32)).shape == (4, 1000)
    assert namespace["noise"](torch.randn(4, 10, 32)).shape == (4, 10, 32)
