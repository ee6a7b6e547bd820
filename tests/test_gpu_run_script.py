"""The plumbing of benchmarks/gpu/run.sh on this machine (no GPU needed): a short run of the import step and the
benchmark steps writes status.tsv and logs.tar.gz, stays within the device transfer's 8 files, and exits with the
status its rows say. The GPU itself is exercised only on a machine that has one (benchmarks/gpu/README.md)."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from sparse import _ext

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def test_short_run_writes_status_and_logs(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "BUDGET_S": "120",
           "STEPS": "import bench_cuda bench_triton", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    rows = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()]
    assert rows[0] == ["step", "rc", "seconds", "log", "summary"]
    status = {r[0]: r[1] for r in rows[1:]}
    assert status["import"] == ("0" if _ext.available() else "1"), proc.stderr[-2000:]
    if not torch.cuda.is_available():
        assert status["bench_cuda"] == status["bench_triton"] == "skipped(no GPU)"
        assert proc.returncode == (0 if _ext.available() else 1)
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and {"status.tsv", "logs.tar.gz"} <= set(files), files
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"env.txt", "import.log"} <= names, names
