"""Other runtimes as contenders in the end-to-end benchmark: ONNX Runtime, DeepSparse, OpenVINO.

None of them is a dependency. Each runs in a child process (:mod:`benchmarks.peer_runner`) started with the
Python of an environment that has it, given as ``name=PYTHON`` pairs (``--peers`` or ``SPARSEKERN_PEERS``):

    SPARSEKERN_PEERS="deepsparse=/opt/ds/bin/python,onnxruntime=/opt/ort/bin/python" make bench

ONNX Runtime is also found without being named when this Python can import it. The model goes to the child as
an ONNX file exported here (``torch.onnx``, which needs the ``onnx`` package in this environment), pruned
weights as zeros of a dense initializer, so every runtime gets the same weights as this package. The parent
times each ``run`` request like any other contender, so peers take their turns in the same interleaved rounds.
A peer that is not configured or fails to start is skipped with a line saying why.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import threading
from typing import Dict, List, Optional

import torch
from torch import nn

from sparse.export import export_onnx

RUNTIMES = ("onnxruntime", "deepsparse", "openvino")
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_runner.py")
HOW = {
    "deepsparse": "its own Python 3.11 venv: pip download --no-deps --only-binary :all: deepsparse==1.8.0, then pip "
                  "install the wheel; pass deepsparse=VENV/bin/python in SPARSEKERN_PEERS",
    "onnxruntime": "pip install onnxruntime (here or in a venv given as onnxruntime=PYTHON in SPARSEKERN_PEERS)",
    "openvino": "pip install openvino in a venv given as openvino=PYTHON in SPARSEKERN_PEERS",
}


def configured(spec: Optional[str] = None) -> Dict[str, str]:
    """{runtime: python} from ``spec`` (``name=PYTHON,...``; default ``$SPARSEKERN_PEERS``), plus ONNX Runtime
    with this Python when it imports here and is not named."""
    spec = os.environ.get("SPARSEKERN_PEERS", "") if spec is None else spec
    out: Dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, python = item.partition("=")
        if not sep or name not in RUNTIMES or not python:
            raise ValueError(f"peer {item!r}: expected NAME=PYTHON with NAME one of {RUNTIMES}")
        if not os.path.isfile(python) or not os.access(python, os.X_OK):
            raise ValueError(f"peer {name}: {python!r} is not an executable Python")
        out[name] = python
    if "onnxruntime" not in out and importlib.util.find_spec("onnxruntime") is not None:
        out["onnxruntime"] = sys.executable
    return out


def missing(peers: Dict[str, str]) -> List[str]:
    """One line per runtime that will not run, and how to make it run."""
    return [f"{name}: not run: not configured ({HOW[name]})" for name in RUNTIMES if name not in peers]


class LastHidden(nn.Module):
    """A transformers encoder as ``input_ids -> last_hidden_state`` (export and AOTInductor take positional
    inputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def export_bert(model: nn.Module, batch: int, seq: int, path: str) -> str:
    """``model`` (a transformers encoder, float32) as an ONNX file at ``path``: input ``input_ids`` [batch, seq]
    (the batch dimension dynamic; ``batch`` is the size traced), output ``last_hidden_state``, eager attention
    (what every runtime's BERT fusions recognise), opset 17, IR version 8 (DeepSparse 1.8's onnx 1.14 reads no
    newer)."""
    from sparse.evaluate import set_attention

    m = copy.deepcopy(model).float().eval()
    set_attention(m, "eager")
    return export_onnx(LastHidden(m), path, torch.zeros(batch, seq, dtype=torch.long), input_names=["input_ids"],
                       output_names=["last_hidden_state"], opset_version=17, ir_version=8,
                       dynamic_axes={"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}})


class Peer:
    """A runtime in a child process, loaded with one model; calling it runs one forward there."""

    def __init__(self, runtime: str, python: str, model_path: str, *, batch: int, seq: int, vocab: int,
                 threads: int, extra: Optional[List[str]] = None, timeout_s: float = 900.0) -> None:
        cmd = [python, RUNNER, runtime, model_path, "--batch", str(batch), "--seq", str(seq), "--vocab", str(vocab),
               "--threads", str(threads), *(extra or [])]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        self.runtime = runtime
        self._stderr: List[str] = []
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, bufsize=1, env=env)
        threading.Thread(target=self._drain, daemon=True).start()
        line = self._read(timeout_s)
        if not line.startswith("ready "):
            self.close()
            raise RuntimeError(f"{runtime} did not start: {line.strip() or self.error()}")
        self.info: Dict[str, object] = json.loads(line[len("ready "):])

    def _drain(self) -> None:
        for line in self._proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-20]

    def error(self) -> str:
        tail = [s.strip() for s in self._stderr if s.strip()]
        return tail[-1][:300] if tail else f"exit status {self._proc.poll()}"

    def _read(self, timeout_s: Optional[float] = None) -> str:
        if timeout_s is None:
            return self._proc.stdout.readline()
        box: List[str] = []
        t = threading.Thread(target=lambda: box.append(self._proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout_s)
        if not box:
            self.close()
            raise TimeoutError(f"{self.runtime}: no answer in {timeout_s:.0f} s")
        return box[0]

    def _ask(self, cmd: str) -> str:
        if self._proc.poll() is not None:
            raise RuntimeError(f"{self.runtime} exited: {self.error()}")
        self._proc.stdin.write(cmd + "\n")
        self._proc.stdin.flush()
        return self._read()

    def __call__(self) -> None:
        if self._ask("run") != "ok\n":
            raise RuntimeError(f"{self.runtime} failed: {self.error()}")

    def profile(self, calls: int = 3) -> Dict[str, float]:
        """{op type: ms per forward} from the runtime's own profiler ({} where it has none)."""
        line = self._ask(f"profile {calls}")
        if not line.startswith("profile "):
            raise RuntimeError(f"{self.runtime} profile failed: {self.error()}")
        return json.loads(line[len("profile "):])

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write("quit\n")
                self._proc.stdin.flush()
                self._proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
