"""One rank of tests/test_distributed.py (run by torch.distributed.run with 2 processes, gloo, loopback).

Every rank builds the same sparsified MLP, trains it under DDP on its half of each global batch, and also
trains an identical copy without DDP on the whole batch (what one process does); it writes, per step, the DDP
loss averaged over ranks and the single-process loss, the gradients' largest difference, and whether the masks
of a movement-pruning GradualPruner agree across ranks."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparse
from sparse.prune import GradualPruner


def model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    sparse.sparsify(m, "block", 0.5, block=16, include=["0", "2"], skip_if_slower=False, sample_tokens=0,
                    fuse_activations=True)
    return m


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    ddp, single = DDP(model()), model()
    opt_d = torch.optim.SGD(ddp.parameters(), lr=0.05)
    opt_s = torch.optim.SGD(single.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(123)  # the same global batches on every rank
    log = []
    for step in range(6):
        x, y = torch.randn(16, 32, generator=gen), torch.randn(16, 8, generator=gen)
        half = slice(rank * 16 // world, (rank + 1) * 16 // world)
        loss_d = nn.functional.mse_loss(ddp(x[half]), y[half])
        opt_d.zero_grad()
        loss_d.backward()
        loss_s = nn.functional.mse_loss(single(x), y)
        opt_s.zero_grad()
        loss_s.backward()
        grad_diff = max((a.grad - b.grad).abs().max().item()
                        for a, b in zip(ddp.module.parameters(), single.parameters()))
        opt_d.step()
        opt_s.step()
        mean = loss_d.detach().clone()
        dist.all_reduce(mean)
        log.append({"ddp_loss": mean.item() / world, "single_loss": loss_s.item(), "grad_diff": grad_diff})
    # movement pruning of a dense model under DDP: the scores come from all-reduced gradients
    torch.manual_seed(1)
    dense = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)))
    pruner = GradualPruner(dense.module, final_sparsity=0.5, end_step=4, frequency=1, method="movement")
    opt = torch.optim.SGD(dense.parameters(), lr=0.05)
    for _ in range(5):
        x, y = torch.randn(8, 32, generator=gen), torch.randn(8, 8, generator=gen)
        loss = nn.functional.mse_loss(dense(x[rank::world]), y[rank::world])
        opt.zero_grad()
        loss.backward()
        pruner.step()
        opt.step()
    masks = torch.cat([m.flatten().float() for m in pruner.masks.values()])
    gathered = [torch.empty_like(masks) for _ in range(world)]
    dist.all_gather(gathered, masks)
    same_masks = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world": world, "log": log, "same_masks": same_masks,
                       "sparsity": 1 - masks.mean().item()}, f)
    # The DDP objects go before the process group: a DDP reducer destroyed after it (when main's frame is torn
    # down) could block at exit in about 1 of 8 runs here.
    del ddp, dense, pruner, opt, opt_d
    dist.barrier()
    dist.destroy_process_group()


def mismatch(out_path: str) -> None:
    """Rank 1 prunes with another seed, then sparsifies a layer rank 0 keeps dense: check_patterns_agree must
    fail on every rank, naming the layer."""
    from sparse.distributed import check_patterns_agree, check_tensors_agree

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    same = model(0)
    n = check_patterns_agree(same)
    torch.manual_seed(rank)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    sparse.sparsify(m, "block", 0.5, block=16, include=["0"], skip_if_slower=False, sample_tokens=0)
    errors = {"pattern": _error_of(check_patterns_agree, m)}
    # Rank 1 also sparsifies layer 2: the ranks hold different sets of sparse layers.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    sparse.sparsify(m, "block", 0.5, block=16, include=["0"] if rank == 0 else ["0", "2"], skip_if_slower=False,
                    sample_tokens=0)
    errors["layers"] = _error_of(check_patterns_agree, m)
    # check_tensors_agree (what sparsify under torchrun checks after distilling): rank 1's "b" differs
    same = {"a": torch.arange(4.0), "mask": torch.ones(3, dtype=torch.bool)}
    errors["tensors_same"] = check_tensors_agree(same)
    errors["tensors"] = _error_of(check_tensors_agree, {**same, "b": torch.full((2,), float(rank))})
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump({"checked": n, "error": errors["pattern"], "layers_error": errors["layers"],
                   "tensors_checked": errors["tensors_same"], "tensors_error": errors["tensors"]}, f)
    dist.destroy_process_group()


def prune(out_path: str) -> None:
    """GradualPruner where the ranks' own gradients and weights differ (so do their local masks): every rank must
    still end with the same masks, those of the ranks' averaged movement scores, or rank 0's magnitude masks."""
    from sparse.prune import magnitude_mask, movement_scores, topk_mask

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    res = {}
    # movement pruning, gradients accumulated under DDP's no_sync: each rank's scores see its own data only
    torch.manual_seed(1)
    ddp = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)))
    pruner = GradualPruner(ddp.module, final_sparsity=0.5, end_step=4, frequency=4, method="movement")
    local = {n: torch.zeros_like(s) for n, s in pruner.scores.items()}  # what this rank alone would score
    gen = torch.Generator().manual_seed(100 + rank)  # other data on every rank
    for _ in range(4):
        x, y = torch.randn(8, 32, generator=gen), torch.randn(8, 8, generator=gen)
        ddp.zero_grad()
        with ddp.no_sync():
            nn.functional.mse_loss(ddp(x), y).backward()
        for n, m in pruner.layers.items():
            local[n] += movement_scores(m.weight, m.weight.grad)
        pruner.step()  # the 4th step (end_step) chooses the masks
    res["movement_local_masks_differ"] = _differs([topk_mask(local[n], 0.5) for n in pruner.layers])
    mean = {n: _mean_over_ranks(s) for n, s in local.items()}
    res["movement_masks_from_mean_scores"] = all(torch.equal(pruner.masks[n], topk_mask(mean[n], 0.5))
                                                 for n in pruner.layers)
    res["movement_same_masks"] = not _differs(list(pruner.masks.values()))
    res["movement_sparsity"] = 1 - torch.cat([m.flatten() for m in pruner.masks.values()]).float().mean().item()
    # magnitude pruning without DDP, every rank with its own weights: rank 0's masks are broadcast
    torch.manual_seed(rank)
    plain = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    local = [magnitude_mask(m.weight, 0.5) for m in (plain[0], plain[2])]
    pruner = GradualPruner(plain, final_sparsity=0.5, end_step=1, frequency=1)
    pruner.step()
    res["magnitude_local_masks_differ"] = _differs(local)
    res["magnitude_same_masks"] = not _differs(list(pruner.masks.values()))
    rank0 = [_from_rank0(m) for m in local]
    res["magnitude_masks_are_rank0s"] = all(torch.equal(a, b) for a, b in zip(pruner.masks.values(), rank0))
    res["magnitude_weights_masked"] = all(torch.equal(m.weight == 0, ~pruner.masks[n]) for n, m in
                                          pruner.layers.items())
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(res, f)
    del ddp
    dist.barrier()
    dist.destroy_process_group()


def _gathered(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _differs(masks) -> bool:
    """Whether any rank's masks differ from rank 0's."""
    gathered = _gathered(torch.cat([m.flatten() for m in masks]).to(torch.uint8))
    return any(not torch.equal(g, gathered[0]) for g in gathered)


def _mean_over_ranks(t):
    return torch.stack(_gathered(t)).sum(0) / dist.get_world_size()


def _from_rank0(mask):
    return _gathered(mask.to(torch.uint8))[0].bool()


def _error_of(fn, *args):
    try:
        fn(*args)
    except ValueError as exc:
        return str(exc)
    return None


if __name__ == "__main__":
    import faulthandler
    import os as _os

    # a hang ends as a traceback on stderr before the test's timeout, never as a silent wait
    faulthandler.dump_traceback_later(float(_os.environ.get("SPARSEKERN_DIST_WATCHDOG", 120)), exit=True)
    if len(sys.argv) > 2 and sys.argv[2] == "mismatch":
        mismatch(sys.argv[1])
    elif len(sys.argv) > 2 and sys.argv[2] == "prune":
        prune(sys.argv[1])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.getcwd(), "ddp.json"))
    sys.stdout.flush()
    sys.stderr.flush()
    _os._exit(0)  # results are written and every rank passed the barrier: no teardown left to hang in
