"""The README's code runs as written."""

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README shows a Python example"
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["o"].shape == (2, 1000, 4, 64) and scope["state"].shape == (2, 4, 64, 64)
    assert scope["y"].shape == (2, 1000, 256) and scope["y_ref"].shape == (2, 64, 4, 64)
    assert scope["cache"].batch_size == 2 and scope["cache"].lengths.tolist() == [10, 13]
    assert scope["o_f"].shape == (1, 12, 2, 16) and scope["s_f"].shape == (1, 2, 16, 16)
    # the three combinations without a fast op, on the generic executor
    assert scope["o_mb"].shape == scope["o_lh"].shape == scope["o_te"].shape == (2, 64, 4, 16)
    assert scope["H_kk"].shape[-2:] == (153, 153) and scope["S"].shape == (2, 4, 16, 16)
