"""Every Python block of README.md runs as written, on tiny models where the block names a big one."""

from __future__ import annotations

import os
import re

import pytest

from sparse._ext import available

pytestmark = pytest.mark.skipif(not available(), reason="sparse._C not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as f:
    BLOCKS = re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)

# What a block names -> the tiny stand-in the test runs instead (same API, seconds instead of minutes).
TINY = {
    "transformers.BertConfig()": "transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, "
                                 "intermediate_size=128, vocab_size=100)",
}


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, "README.md lost its Python examples"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path, monkeypatch):
    code = BLOCKS[i]
    for big, tiny in TINY.items():
        code = code.replace(big, tiny)
    monkeypatch.chdir(tmp_path)  # blocks that save write here
    exec(compile(code, f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})
