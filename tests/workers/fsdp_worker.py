"""One rank of tests/test_distributed.py's FSDP2 test: a sparsified MLP (block and balanced layers) under
torch.distributed.fsdp.fully_shard, trained for a few steps on the same batches as an unsharded copy."""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import sparse
import sparse.distributed


def sparse_mlp(seed: int = 0) -> nn.Sequential:
    """A block-sparse, a balanced-sparse and a dense layer (also built by tests/test_distributed.py)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    sparse.sparsify(model, "block", 0.5, block=16, include=["0"], skip_if_slower=False, sample_tokens=0)
    sparse.sparsify(model, "balanced", 0.5, bank=16, include=["2"], skip_if_slower=False, sample_tokens=0)
    return model


def shard(model: nn.Sequential) -> list:
    changed = sparse.nn.contiguous_parameters(model)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return changed


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = sparse_mlp()
    single = copy.deepcopy(model)
    changed = shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_s = torch.optim.SGD(single.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    log = []
    for _ in range(4):
        x, y = torch.randn(8, 32, generator=gen), torch.randn(8, 8, generator=gen)
        out, out_s = model(x), single(x)
        loss, loss_s = nn.functional.mse_loss(out, y), nn.functional.mse_loss(out_s, y)
        opt.zero_grad()
        opt_s.zero_grad()
        loss.backward()
        loss_s.backward()
        grad_diff = max((a.grad.full_tensor() - b.grad).abs().max().item()
                        for a, b in zip(model.parameters(), single.parameters()))
        opt.step()
        opt_s.step()
        log.append({"loss": loss.item(), "single_loss": loss_s.item(), "out_diff": (out - out_s).abs().max().item(),
                    "grad_diff": grad_diff})
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"world": dist.get_world_size(), "changed": changed, "log": log}, f)
    dist.destroy_process_group()


def save(out_path: str) -> None:
    """Trains the sharded model a few steps, then saves it with torch.distributed.checkpoint into
    ``out_path + ".ckpt"``; rank 0 writes an input and the sharded model's output on it to ``out_path + ".pt"``."""
    import torch.distributed.checkpoint as dcp

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = sparse_mlp()
    shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):  # the values move away from their initial ones
        x, y = torch.randn(8, 32, generator=gen), torch.randn(8, 8, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    x = torch.randn(5, 32, generator=gen)
    with torch.no_grad():
        out = model(x)
    dcp.save(model.state_dict(), checkpoint_id=out_path + ".ckpt")
    # read back at the same world size into a sharded model pruned otherwise (other masks, same sizes)
    back = sparse_mlp(seed=1)
    shard(back)
    with torch.no_grad():
        before = (back(x) - out).abs().max().item()
        sparse.distributed.load_checkpoint(back, out_path + ".ckpt")
        after = (back(x) - out).abs().max().item()
    if dist.get_rank() == 0:
        torch.save({"x": x, "out": out, "world": dist.get_world_size(), "sharded_reload_diff": [before, after],
                    "sharded": sorted(n for n, p in model.named_parameters() if type(p).__name__ == "DTensor")},
                   out_path + ".pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import faulthandler
    import os as _os

    # a hang ends as a traceback on stderr before the test's timeout, never as a silent wait
    faulthandler.dump_traceback_later(float(_os.environ.get("SPARSEKERN_DIST_WATCHDOG", 120)), exit=True)
    if len(sys.argv) > 2 and sys.argv[2] == "save":
        save(sys.argv[1])
    else:
        main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    _os._exit(0)  # no interpreter teardown left to hang in (see ddp_worker.py)
