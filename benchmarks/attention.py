"""Attention alone: our kernel (``sparse.ops.attention``, ``sparsekern::attention``) against torch's SDPA (its own
choice, and its math and flash CPU backends forced), each giving what a transformers model needs next: the output
as ``[B, L, H, D]`` (SDPA's ``[B, H, L, D]`` made contiguous after a transpose, as transformers does).

q, k and v are views of one packed ``[B, L, 3 * H * D]`` projection, as transformers makes them. Shapes: BERT-base
(12 heads of 64), all-MiniLM-L6-v2 (12 of 32), GPT-2 small causal (12 of 64); batch 1 / 8 / 32, sequence 128 and
512; fp32 and bf16; 1 and 2 threads. Every case is checked against a float64 reference once, timed with the
shared harness (interleaved rounds, one CSV schema), and ``summary.md`` lists each case's ratio against the
fastest SDPA form (> 1: ours faster).

    python -m benchmarks.attention                  # the grid above (a few minutes)
    python -m benchmarks.attention --preset quick   # BERT-base and MiniLM at sequence 128, fp32, 2 threads
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from sparse import ops

from .harness import Contender, make_rows, measure, result_error, threads, write_csv

# name -> (heads, head_dim, causal)
MODELS: Dict[str, Tuple[int, int, bool]] = {"bert-base": (12, 64, False), "minilm": (12, 32, False),
                                             "gpt2-small": (12, 64, True)}
SDPA_FORMS = {"sdpa": None, "sdpa_math": "MATH", "sdpa_flash": "FLASH_ATTENTION"}


@dataclass
class Preset:
    models: List[str]
    batches: List[int]
    seqs: List[int]
    dtypes: List[str]
    threads: List[int]
    rounds: int = 7


PRESETS = {
    "full": Preset(["bert-base", "minilm", "gpt2-small"], [1, 8, 32], [128, 512], ["float32", "bfloat16"], [1, 2]),
    "quick": Preset(["bert-base", "minilm"], [1, 8], [128], ["float32"], [2]),
    "tiny": Preset(["minilm"], [1], [16], ["float32"], [1], rounds=2),
}


def _sdpa(q, k, v, scale, causal, backend):
    def run():
        if backend is None:
            o = F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([getattr(SDPBackend, backend)]):
                o = F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)
        return o.transpose(1, 2).contiguous()

    return run


def case_rows(model: str, batch: int, seq: int, dtype: str, n_threads: int, rounds: int) -> List[dict]:
    heads, dim, causal = MODELS[model]
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, 3 * heads * dim, generator=g).to(dt)
    q, k, v = (t.view(batch, seq, heads, dim).transpose(1, 2) for t in x.split(heads * dim, -1))
    scale = dim**-0.5
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale,
                                         is_causal=causal).transpose(1, 2)
    shape = f"{model} {heads}x{dim}{' causal' if causal else ''}"
    info = {"format": "dense", "block": "", "dtype": dtype, "shape": shape, "tokens": batch * seq,
            "sparsity": 0.0, "notes": f"batch {batch}, sequence {seq}"}
    cs = [Contender("sparsekern", lambda: ops.attention(q, k, v, None, scale, causal),
                    {**info, "backend": "sparsekern"}, expected=ref)]
    for name, backend in SDPA_FORMS.items():
        fn = _sdpa(q, k, v, scale, causal, backend)
        try:
            fn()
        except RuntimeError:  # a forced backend that does not take this case
            continue
        cs.append(Contender(name, fn, {**info, "backend": name, "dense_ref": True}, expected=ref))
    tol = 1e-4 if dt == torch.float32 else 3e-2
    for c in cs:
        err = result_error(c, c.fn())
        if not err <= tol:
            raise AssertionError(f"{model} b{batch} L{seq} {dtype}: {c.name} relative error {err:.2e} > {tol}")
    with threads(n_threads):
        timings = measure(cs, rounds=rounds)
    case = f"attention:{model}:b{batch}:L{seq}:{dtype}:t{n_threads}"
    common = {"op": "attention", "threads": n_threads, "weights": "hot"}
    return make_rows("attention", case, common, cs, timings, "best_dense")


def summary(rows: List[dict]) -> str:
    lines = ["# Attention: ours against the fastest SDPA form (same run, same inputs)", "",
             "Ratio = fastest SDPA form's median / ours (> 1: ours faster). Output [B, L, H, D] for every contender.",
             "", "| model | batch | seq | dtype | threads | ours ms | fastest SDPA | its ms | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["backend"] != "sparsekern":
            continue
        model = r["shape"].split(" ")[0]
        b, s = r["notes"].split(", ")
        lines.append(f"| {model} | {b.split(' ')[1]} | {s.split(' ')[1]} | {r['dtype']} | {r['threads']} | "
                     f"{r['median_s'] * 1e3:.3f} | {r['baseline']} | {r['baseline_s'] * 1e3:.3f} | "
                     f"{r['ratio']:.2f} |")
    machine = rows[0]["machine"] if rows else "?"
    return "\n".join(lines + ["", f"Machine: {machine}; isa {rows[0]['isa'] if rows else '?'}.", ""])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--out", default="bench-out/attention")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    rows: List[dict] = []
    for n_threads in p.threads:
        for model in p.models:
            for dtype in p.dtypes:
                for batch in p.batches:
                    for seq in p.seqs:
                        rows += case_rows(model, batch, seq, dtype, n_threads, p.rounds)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "attention.csv"), rows)
    text = summary(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
