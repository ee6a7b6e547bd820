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


def _launch(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node nproc ... args`` on 127.0.0.1 and a free port, bounded in
    time; asserts it succeeded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), *args]
    timeout = float(os.environ.get("SPARSEKERN_DIST_TIMEOUT", 300))  # each worker's watchdog fires at 120 s
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{args[:3]} timed out: {(exc.stderr or b'')[-3000:]!r}") from None
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _torchrun(worker: str, out, *extra: str) -> dict:
    _launch(os.path.join(HERE, "workers", worker), str(out), *extra)
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
        assert res["tensors_checked"] == 2 and res["tensors_error"] == "'b' differs between rank 0 and rank 1", res


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


def _fsdp_worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsdp_worker", os.path.join(HERE, "workers", "fsdp_worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two fresh interpreters
@needs_dist
def test_dcp_checkpoint_of_fsdp2_model_loads_at_world_size_one(tmp_path):
    from sparse.distributed import load_checkpoint

    _torchrun("fsdp_worker.py", tmp_path / "dcp", "save")  # trains, saves with DCP, reloads sharded
    saved = torch.load(tmp_path / "dcp.pt")
    assert saved["world"] == 2 and {"0.values", "2.values"} <= set(saved["sharded"])
    before, after = saved["sharded_reload_diff"]  # at world size 2, into a sharded model pruned otherwise
    assert before > 1e-3 and after == 0.0, saved["sharded_reload_diff"]
    # world size 1, no process group: a plain (unsharded) model, pruned with other masks of the same sizes
    plain = _fsdp_worker().sparse_mlp(seed=3)
    x, out = saved["x"], saved["out"]
    with torch.no_grad():
        assert (plain(x) - out).abs().max() > 1e-3
        load_checkpoint(plain, tmp_path / "dcp.ckpt")
        torch.testing.assert_close(plain(x), out)
    assert not torch.distributed.is_initialized()
    assert not plain[0].values.is_contiguous(), "the block values are back in the kernels' layout"


@needs_dist
def test_load_checkpoint_refuses_other_layers_and_corrupt_patterns(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch import nn

    import sparse
    from sparse.distributed import load_checkpoint

    def mlp(seed, sparsity=0.5, include=("0", "2")):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        sparse.sparsify(m, "block", sparsity, block=16, include=list(include), skip_if_slower=False, sample_tokens=0)
        return m

    model = mlp(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        dcp.save(model.state_dict(), checkpoint_id=tmp_path / "ok")
        corrupt = model.state_dict()
        corrupt["0.col_indices"] = corrupt["0.col_indices"].clone()
        corrupt["0.col_indices"][0] = 99
        dcp.save(corrupt, checkpoint_id=tmp_path / "corrupt")
        x = torch.randn(3, 32)
        target = mlp(1)
        load_checkpoint(target, tmp_path / "ok")
        torch.testing.assert_close(target(x), model(x))

        other = mlp(1, include=("0",))
        with pytest.raises(ValueError, match=r"sparse only in the checkpoint: \['2'\], sparse only in the model: \[\]"):
            load_checkpoint(other, tmp_path / "ok")
        other = mlp(1, sparsity=0.75)
        with pytest.raises(ValueError, match=r"layer '0': the checkpoint's '0.values' is \(4, 16, 16\), this "
                                             r"model's is \(2, 16, 16\)"):
            load_checkpoint(other, tmp_path / "ok")
        target = mlp(2)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(RuntimeError, match=r"0\.: the stored pattern is invalid.*col_indices"):
            load_checkpoint(target, tmp_path / "corrupt")
        after = target.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("0.")), "layer 0 left as it was"
        with pytest.raises(FileNotFoundError, match="no torch.distributed.checkpoint there"):
            load_checkpoint(target, tmp_path / "missing")


@pytest.mark.slow  # two fresh interpreters that load transformers, distil and time a tiny BERT
@needs_dist
def test_sparsify_distills_under_torchrun(tmp_path):
    pytest.importorskip("transformers")
    import sparse
    from tests.helpers import tiny_bert_dir

    model = tiny_bert_dir(str(tmp_path / "tiny-bert"))
    out = tmp_path / "out"
    run = _launch("-m", "sparse", "sparsify", "--model", model, "--pattern", "block", "--block", "32", "--sparsity",
                  "0.5", "--prune-method", "magnitude", "--recover-seconds", "3", "--batch-size", "8",
                  "--no-skip-if-slower", "--out", str(out), "--heldout", "40", "--seq", "16", "--latency-rounds", "2",
                  "--threads", "1", "--no-progress")
    assert run.stdout.count("# sparsekern report") == 1, run.stdout[-2000:]  # rank 0 alone reports
    report = json.loads((out / "report.json").read_text())
    rec = report["recovery"]
    assert rec["world_size"] == 2 and rec["per_rank_batch"] == [4, 4], rec  # each rank its half of a batch of 8
    assert rec["steps"] >= 1 and rec["steps_per_second"] == pytest.approx(rec["steps"] / rec["seconds"])
    # both ranks ended with the same masks (12 encoder Linears) and trained weights (every parameter but the
    # frozen input embeddings), else sparsify fails naming the first that differs
    trained = sum(1 for n, _ in sparse.load(None, out).named_parameters() if n != "embeddings.word_embeddings.weight")
    assert rec["ranks_checked"] == 12 + trained, rec
    md = (out / "report.md").read_text()
    assert f"{rec['steps_per_second']:.2f} steps/s on 2 processes (DDP, gloo), batch split 4+4" in md
    blocks = [m for m in sparse.load(None, out).modules() if isinstance(m, sparse.BlockSparseLinear)]
    assert len(blocks) == 12 and all(m.sparsity == pytest.approx(0.5) for m in blocks)
