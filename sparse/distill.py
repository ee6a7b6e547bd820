"""Pruning a model's dense Linear weights (by magnitude, or by SparseGPT's layer-wise reconstruction), and
accuracy recovery by distillation from the dense model.

Recovery trains with dense, masked weights (fast on a CPU: MKL/oneDNN dense GEMMs and no sparse backward) and
only at the end are the sparse modules swapped in, built from the same masks. The recipe, chosen from runs on
all-MiniLM-L6-v2 (docs/measurements.md): student = pruned copy whose masks are re-applied after every step;
teacher = the dense model; loss = sum over layers of the MSE between student and teacher hidden states (padding
excluded); AdamW.

Under ``torch.distributed`` (``torchrun``), :func:`distill` trains with DistributedDataParallel: every rank takes its
share of each global batch, the gradients are averaged over the ranks, and every rank keeps the same masks.
"""

from __future__ import annotations

import random
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import prune, walk
from .distributed import check_tensors_agree, is_multi_rank

__all__ = ["prunable_linears", "compute_masks", "apply_masks", "reconstruct", "distill"]


def prunable_linears(model: nn.Module, prefix: str = "encoder.") -> Dict[str, nn.Linear]:
    """The ``nn.Linear`` layers whose dotted name starts with ``prefix`` (for BERT-style models: every
    attention and feed-forward Linear, but not the pooler), by name."""
    return {
        name: m
        for name, m in walk.linear_layers(model, dense_only=True)
        if isinstance(m, nn.Linear) and name.startswith(prefix)
    }


def compute_masks(layers: Dict[str, nn.Linear], pattern: str, *, sparsity: float, block: int = 32, bank: int = 32,
                  keep: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """One bool mask [out, in] per layer, by magnitude. ``pattern`` is ``"block"`` (tiles of ``block``, a
    ``sparsity`` fraction dropped, by L2 norm), ``"balanced"`` (``keep`` of every ``bank``; default
    ``round(bank * (1 - sparsity))``) or ``"unstructured"`` (the layer's largest ``|w|``, a ``sparsity`` fraction
    dropped)."""
    masks = {}
    for name, m in layers.items():
        if pattern == "block":
            masks[name] = prune.block_mask(m.weight, block, sparsity)
        elif pattern == "balanced":
            masks[name] = prune.balanced_mask(
                m.weight, bank, keep if keep is not None else round(bank * (1 - sparsity))
            )
        elif pattern == "unstructured":
            masks[name] = prune.magnitude_mask(m.weight, sparsity)
        else:
            raise ValueError(f"pattern must be 'block', 'balanced' or 'unstructured', got {pattern!r}")
    return masks


@torch.no_grad()
def apply_masks(layers: Dict[str, nn.Linear], masks: Dict[str, torch.Tensor]) -> None:
    """Zeroes the weights outside each layer's mask, in place."""
    for name, m in layers.items():
        m.weight.mul_(masks[name].to(m.weight.dtype))


def _obs_prune(W: torch.Tensor, H: torch.Tensor, pattern: str, *, sparsity: float, block: int, bank: int, keep: int,
               damp: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2023) for one layer: prunes ``W`` [out, in] given the Hessian
    ``H = X^T X`` [in, in] of its inputs, walking the columns left to right and moving each pruned weight's
    error onto the columns not yet visited (optimal brain surgeon updates through the Cholesky factor of
    ``H^-1``). Returns (new weight, bool mask [out, in]).

    balanced: every bank picks its ``keep`` weights when the walk reaches it, by the saliency
    ``w^2 / [H^-1]_cc^2``. unstructured: as the paper, every group of 128 columns, when the walk reaches it, drops
    its ``floor(sparsity * n)`` weights of least saliency (of its ``n``), the mask adapting to the updated weights.
    block: tiles are chosen up front by their summed saliency (a tile spans 32 columns, so it cannot be chosen
    column by column), with the count rule of :func:`sparse.prune.block_mask`."""
    W = W.detach().double().clone()
    H = H.double().clone()
    out, inn = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(inn, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    diag = torch.diag(Hinv)
    if pattern == "block":
        mask = prune.block_mask(W, block, sparsity, scores=W.pow(2) / diag.pow(2))
    else:
        mask = torch.zeros(out, inn, dtype=torch.bool)
    step = bank * max(1, 128 // bank) if pattern == "balanced" else 128
    for i1 in range(0, inn, step):
        i2 = min(i1 + step, inn)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if pattern == "unstructured":
            mask[:, i1:i2] = prune.topk_mask(W1.pow(2) / torch.diag(Hinv1).pow(2), sparsity)
        for i in range(i2 - i1):
            if pattern == "balanced" and i % bank == 0:
                sal = W1[:, i:i + bank].pow(2) / torch.diag(Hinv1)[i:i + bank].pow(2)
                top = torch.topk(sal, keep, dim=1).indices
                mask[:, i1 + i:i1 + i + bank].scatter_(1, top, True)
            w = W1[:, i]
            q = w * mask[:, i1 + i]
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return W, mask


def _layer_groups(names: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """Linear names grouped by their Transformer block (the prefix up to the first numeric component, e.g.
    ``encoder.layer.3``), in model order; names without one form their own group."""
    groups: Dict[str, List[str]] = {}
    for name in names:
        m = re.match(r"^(.*?\.\d+)\.", name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    return list(groups.items())


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    layers: Dict[str, nn.Linear],
    pattern: str,
    *,
    sparsity: float,
    block: int = 32,
    bank: int = 32,
    keep: Optional[int] = None,
    batch_size: int = 64,
    max_length: int = 64,
    progress: bool = True,
) -> Dict[str, torch.Tensor]:
    """Prunes ``layers`` of ``model`` in place with SparseGPT (see :func:`_obs_prune`), one Transformer block at a
    time: each block's Hessians come from the model with the earlier blocks already pruned (``sentences`` are
    the calibration text; padding tokens are left out). Returns the masks ``{name: bool [out, in]}``."""
    if keep is None:
        keep = round(bank * (1 - sparsity))
    groups = _layer_groups(list(layers))
    encs = [tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt") for i in range(0, len(sentences), batch_size)]
    was_training = model.training
    model.eval()
    masks: Dict[str, torch.Tensor] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups), desc="pruning (SparseGPT)", unit="block", leave=False)
    try:
        for _, names in groups:
            hessians = {
                n: torch.zeros(layers[n].in_features, layers[n].in_features, dtype=torch.float64) for n in names
            }
            current: Dict[str, torch.Tensor] = {}

            def hook(name):
                def fn(module, inputs):
                    x = inputs[0]
                    x = x[current["mask"]] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
                    x = x.double()
                    hessians[name].addmm_(x.t(), x)
                return fn

            handles = [layers[n].register_forward_pre_hook(hook(n)) for n in names]
            try:
                for enc in encs:
                    current["mask"] = enc["attention_mask"].bool()
                    model(**enc)
            finally:
                for h in handles:
                    h.remove()
            for n in names:
                W, masks[n] = _obs_prune(layers[n].weight, hessians[n], pattern, sparsity=sparsity, block=block,
                                         bank=bank, keep=keep)
                layers[n].weight.copy_(W.to(layers[n].weight.dtype))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return masks


def _hidden_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                 attention_mask: torch.Tensor) -> torch.Tensor:
    """Sum over layers of the mean squared error per real (non-padding) token, averaged over features."""
    m = attention_mask.unsqueeze(-1).to(student_hidden[0].dtype)
    denom = m.sum() * student_hidden[0].shape[-1]
    loss = student_hidden[0].new_zeros(())
    for s, t in zip(student_hidden, teacher_hidden):
        loss = loss + ((s - t).pow(2) * m).sum() / denom
    return loss


def distill(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    masks: Dict[str, torch.Tensor],
    *,
    seconds: float,
    lr: float = 3e-4,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    max_steps: Optional[int] = None,
    teacher_hidden: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> Dict[str, float]:
    """Trains ``student`` (in place) to reproduce ``teacher``'s hidden states on ``sentences`` for ``seconds`` of
    wall time, keeping the weights outside ``masks`` (``{Linear name in student: bool [out, in]}``) at zero.

    Batches are ``batch_size`` sentences drawn in a seeded shuffled order (reshuffled every pass), tokenised to at
    most ``max_length`` tokens. The learning rate warms up linearly over the first 10 steps, then stays constant
    (the budget is a time, so the step count is not known in advance).
    Returns ``{"steps", "seconds", "steps_per_second", "first_loss", "last_loss", "world_size"}`` (losses: mean of
    the first / last 10 steps).

    ``teacher_hidden``: for a student with fewer layers than the teacher (``sparse.prune.drop_layers``), the
    teacher's hidden-state index each of the student's hidden states is compared to, the embeddings (0) first
    (``sparse.prune.teacher_hidden_states`` gives it for the kept layers); default: the same index, which needs
    a student as deep as the teacher (``ValueError`` otherwise).

    Across processes (``torch.distributed`` initialised with more than one rank, e.g. under ``torchrun``; the
    batches stay on the CPU, so a gloo process group): every rank must call it with the same student, teacher,
    sentences, masks and seed (DistributedDataParallel starts every rank from rank 0's student). ``batch_size`` is
    then the global batch: every rank draws the same batches and trains on its share (sentences ``rank::world``)
    under DistributedDataParallel, which averages the gradients; the ranks stop after the same step (rank 0's clock
    decides), and at the end the masks and every trained weight are checked to be equal on every rank
    (``ValueError`` naming the first that differs). The losses are averaged over the ranks, and the result also has
    ``"per_rank_batch"`` and ``"ranks_checked"`` (the number of tensors compared)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if len(sentences) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} training sentences, got {len(sentences)}")
    multi = is_multi_rank()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if multi else (0, 1)
    if batch_size < world:
        raise ValueError(f"batch_size={batch_size} is smaller than the {world} ranks: each needs a sentence per step")
    if teacher_hidden is not None:
        teacher_hidden = [int(i) for i in teacher_hidden]
        if not teacher_hidden or teacher_hidden[0] != 0 or teacher_hidden != sorted(set(teacher_hidden)):
            raise ValueError(f"teacher_hidden must start at 0 (the embeddings) and increase, got {teacher_hidden}")
    layers = {name: m for name, m in student.named_modules() if name in masks}
    missing = sorted(set(masks) - set(layers))
    if missing:
        raise ValueError(f"masks name layers the student does not have: {missing[:4]}")
    apply_masks(layers, masks)
    float_masks = {name: masks[name].to(m.weight.dtype) for name, m in layers.items()}

    teacher.eval()
    student.eval()  # no dropout: the student should match the teacher's deterministic outputs
    for p in teacher.parameters():
        p.requires_grad_(False)
    # The input embeddings are not pruned and hold half of a small model's weights: training them would double
    # the optimizer's work (and their dense gradient) for nothing the masks changed.
    frozen = set()
    if hasattr(student, "get_input_embeddings") and student.get_input_embeddings() is not None:
        frozen = {id(p) for p in student.get_input_embeddings().parameters()}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in frozen]
    for p in student.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    forward = student
    if multi:
        from torch.nn.parallel import DistributedDataParallel

        # The pooler (in the forward, not in the loss) gets no gradient: unused parameters must be found.
        forward = DistributedDataParallel(student, find_unused_parameters=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup_steps = 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup_steps))

    rng = random.Random(seed)
    order: List[int] = []
    losses: List[float] = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=round(seconds), desc="distilling", unit="s", leave=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s{postfix}")
    start = time.monotonic()
    shown = 0
    steps = 0
    try:
        while _go_on(time.monotonic() - start < seconds and (max_steps is None or steps < max_steps), multi):
            if len(order) < batch_size:
                order = list(range(len(sentences)))
                rng.shuffle(order)
            batch = [sentences[order.pop()] for _ in range(batch_size)]
            if multi:
                batch = batch[rank::world]  # this rank's share of the global batch
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.no_grad():
                t_hidden = teacher(**enc, output_hidden_states=True).hidden_states
            s_hidden = forward(**enc, output_hidden_states=True).hidden_states
            t_hidden = _matched(t_hidden, len(s_hidden), teacher_hidden)
            # hidden_states[0] is the embedding output, which pruning the encoder does not change.
            loss = _hidden_loss(s_hidden[1:], t_hidden[1:], enc["attention_mask"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for name, m in layers.items():
                    m.weight.mul_(float_masks[name])
            steps += 1
            losses.append(loss.item())
            if bar is not None:
                now = min(round(time.monotonic() - start), bar.total)
                bar.set_postfix_str(f"step {steps}, loss {losses[-1]:.4f}", refresh=False)
                bar.update(now - shown)
                shown = now
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.monotonic() - start
    result = {"world_size": world}
    if multi:
        del forward  # the DDP reducer goes before any process group teardown
        mean = torch.tensor(losses, dtype=torch.float64)
        torch.distributed.all_reduce(mean)
        losses = (mean / world).tolist()
        tensors = {f"{name}.mask": masks[name] for name in layers}
        tensors.update({name: p.detach() for name, p in student.named_parameters() if p.requires_grad})
        result["ranks_checked"] = check_tensors_agree(tensors)
        result["per_rank_batch"] = [len(range(r, batch_size, world)) for r in range(world)]
    head, tail = losses[:10], losses[-10:]
    result.update(steps=steps, seconds=elapsed, steps_per_second=steps / elapsed, first_loss=sum(head) / len(head),
                  last_loss=sum(tail) / len(tail))
    return result


def _matched(teacher: Sequence[torch.Tensor], n_student: int,
             index: Optional[Sequence[int]]) -> Sequence[torch.Tensor]:
    """The teacher's hidden states the student's ``n_student`` are compared to, in order."""
    if index is None:
        if len(teacher) != n_student:
            raise ValueError(f"the student has {n_student} hidden states and the teacher {len(teacher)}: give "
                             "teacher_hidden (sparse.prune.teacher_hidden_states) to say which teacher layers the "
                             "student's stand for")
        return teacher
    if len(index) != n_student or index[-1] >= len(teacher):
        raise ValueError(f"teacher_hidden {list(index)} must name one of the teacher's {len(teacher)} hidden states "
                         f"for each of the student's {n_student}")
    return [teacher[i] for i in index]


def _go_on(local: bool, multi: bool) -> bool:
    """Whether to take another step: this process's answer, or across ranks rank 0's, so every rank takes the
    same number of steps (a rank that stopped alone would leave the others waiting in an all-reduce)."""
    if not multi:
        return local
    flag = torch.tensor([1 if local else 0], dtype=torch.int64)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())
