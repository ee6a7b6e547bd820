"""Sparse models under DistributedDataParallel: 2 gloo processes on this machine (loopback), started by
torch.distributed.run; see tests/dist/ddp_worker.py for what each rank does."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters (~10-20 s)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_ddp_two_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), os.path.join(HERE, "dist", "ddp_worker.py"), str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2
    for step in res["log"]:  # the same loss curve and gradients as one process on the same global batches
        assert step["ddp_loss"] == pytest.approx(step["single_loss"], rel=1e-5, abs=1e-6), res["log"]
        assert step["grad_diff"] < 1e-5, res["log"]
    assert res["same_masks"] and res["sparsity"] == pytest.approx(0.5, abs=0.01)
