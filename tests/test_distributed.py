"""Sparse models under DistributedDataParallel: 2 gloo processes on this machine (loopback), started by
torch.distributed.run; see tests/workers/ddp_worker.py for what each rank does."""

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


def _torchrun(worker: str, out, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), os.path.join(HERE, "workers", worker), str(out), *extra]
    timeout = float(os.environ.get("SPARSEKERN_DIST_TIMEOUT", 300))  # each worker's watchdog fires at 120 s
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{worker} timed out: {(exc.stderr or b'')[-3000:]!r}") from None
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text()) if out.exists() else {}


needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


@pytest.mark.slow  # two fresh interpreters (~10-20 s)
@needs_dist
def test_ddp_two_processes_match_one_process(tmp_path):
    res = _torchrun("ddp_worker.py", tmp_path / "ddp.json")
    assert res["world"] == 2
    for step in res["log"]:  # the same loss curve and gradients as one process on the same global batches
        assert step["ddp_loss"] == pytest.approx(step["single_loss"], rel=1e-5, abs=1e-6), res["log"]
        assert step["grad_diff"] < 1e-5, res["log"]
    assert res["same_masks"] and res["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow  # two fresh interpreters
@needs_dist
def test_fsdp2_shards_sparse_layers_and_matches_one_process(tmp_path):
    res = _torchrun("fsdp_worker.py", tmp_path / "fsdp.json")
    assert res["world"] == 2 and res["changed"] == ["0.values"]  # the block layer's transposed-view values
    for step in res["log"]:
        assert step["out_diff"] < 1e-5 and step["grad_diff"] < 1e-5, res["log"]
        assert step["loss"] == pytest.approx(step["single_loss"], rel=1e-5), res["log"]


def test_contiguous_parameters_keeps_outputs_and_gradients():
    import copy

    from torch import nn

    import sparse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    sparse.sparsify(model, "block", 0.5, block=16, skip_if_slower=False, sample_tokens=0)
    ref = copy.deepcopy(model)
    assert not model[0].values.is_contiguous()
    assert sparse.nn.contiguous_parameters(model) == ["0.values", "2.values"]
    assert all(p.is_contiguous() for p in model.parameters())
    x = torch.randn(5, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    model(x).square().sum().backward()
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert sparse.nn.contiguous_parameters(model) == []
    # load_state_dict keeps them contiguous (as FSDP2 needs), whatever layout the state dict holds
    model.load_state_dict(ref.state_dict())
    model.load_state_dict(ref.state_dict(), assign=True)
    assert sparse.nn.contiguous_parameters(model) == []
    torch.testing.assert_close(model(x), ref(x))


@pytest.mark.slow  # two fresh interpreters
@needs_dist
def test_ranks_with_different_patterns_are_refused_naming_the_layer(tmp_path):
    out = tmp_path / "mismatch.json"
    _torchrun("ddp_worker.py", out, "mismatch")
    for rank in (0, 1):
        res = json.loads((tmp_path / f"mismatch.json.{rank}").read_text())
        assert res["checked"] == 2  # the same model on both ranks passes
        assert res["error"] and res["error"].startswith("layer '0': its sparsity pattern on rank 1 differs"), res
        # rank 1 sparsified layer '2' too, which rank 0 keeps dense: the layer sets differ, the error names it
        assert res["layers_error"] == (f"rank 1 holds other sparse layers than rank 0 (differing: ['2']); rank "
                                       f"{rank} sees {1 + rank} sparse layers. Every rank must sparsify the same "
                                       "layers."), res


def test_check_patterns_agree_needs_a_process_group():
    from torch import nn

    from sparse.distributed import check_patterns_agree

    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        check_patterns_agree(nn.Linear(2, 2))


@pytest.mark.slow  # two fresh interpreters
@needs_dist
def test_gradual_pruner_gives_every_rank_the_same_masks(tmp_path):
    out = tmp_path / "prune.json"
    _torchrun("ddp_worker.py", out, "prune")
    for rank in (0, 1):
        res = json.loads((tmp_path / f"prune.json.{rank}").read_text())
        # the ranks' own gradients (no_sync) and own weights would give other masks on each rank ...
        assert res["movement_local_masks_differ"] and res["magnitude_local_masks_differ"], res
        # ... but the pruner's are the same everywhere: from the ranks' averaged movement scores, or rank 0's
        assert res["movement_same_masks"] and res["movement_masks_from_mean_scores"], res
        assert res["movement_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert res["magnitude_same_masks"] and res["magnitude_masks_are_rank0s"], res
        assert res["magnitude_weights_masked"], res
