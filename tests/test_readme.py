"""Every Python block of README.md runs as written, on tiny models where the block names a big one; a block that
needs an optional package skips where it is not installed, and a torchrun script runs as a one-process group."""

from __future__ import annotations

import importlib.util
import os
import re
import socket

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

# What a block calls -> the optional packages it needs (not dependencies of sparse).
OPTIONAL = {"sparse.export_onnx(": ("onnx",), "import onnxruntime": ("onnxruntime",)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, "README.md lost its Python examples"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path, monkeypatch):
    code = BLOCKS[i]
    for big, tiny in TINY.items():
        code = code.replace(big, tiny)
    missing = sorted({m for call, mods in OPTIONAL.items() if call in code for m in mods
                      if importlib.util.find_spec(m) is None})
    if missing:
        pytest.skip(f"README.md python block {i + 1} needs {', '.join(missing)} (optional, not installed)")
    monkeypatch.chdir(tmp_path)  # blocks that save write here
    if "init_process_group" in code:  # a torchrun script: what torchrun would set, for one process on loopback
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
            monkeypatch.setenv(key, value)
    try:
        exec(compile(code, f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # a block that failed half-way leaves no group behind
            dist.destroy_process_group()
