"""Runs one ONNX model in another runtime (ONNX Runtime, DeepSparse, OpenVINO) for the benchmarks, as a child
process that the parent times call by call.

Started by :mod:`benchmarks.peers` with the Python of the environment that has the runtime (DeepSparse needs its
own: it pins old numpy and onnx). It imports neither torch nor this package, only numpy and the runtime, so it
runs in any such environment. Protocol, one line each way:

    child  -> parent   ready {"runtime": ..., "version": ..., ...}     (after loading and two warm-up calls)
    parent -> child    run          child -> parent   ok
    parent -> child    profile N    child -> parent   profile {"op type": ms per call, ...}   (ONNX Runtime only;
                                 "MatMul:attention": the MatMuls between two activations, i.e. of attention)
    parent -> child    quit         (or end of input)

Errors go to stderr and end the child with a non-zero status, which the parent reports.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

import numpy as np


def _onnxruntime(args):
    import onnxruntime as ort

    path = args.model
    if args.bert_fusions:
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(path, model_type="bert", num_heads=args.num_heads, hidden_size=args.hidden_size)
        path = os.path.join(tempfile.mkdtemp(prefix="ort-"), "optimized.onnx")
        opt.save_model_to_file(path)
    if args.quantize_int8:  # its dynamic quantization: int8 weights, activations quantized per call
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        tmp = tempfile.mkdtemp(prefix="ort-int8-")
        # Types and shapes of every tensor first (ORT's documented pre-processing); the fused graph lacks some.
        quant_pre_process(path, os.path.join(tmp, "pre.onnx"), skip_optimization=True)
        quantize_dynamic(os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "int8.onnx"), weight_type=QuantType.QInt8)
        path = os.path.join(tmp, "int8.onnx")

    def session(profile=False):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its idle threads otherwise spin for a while after each call, on the cores the next contender (timed in
        # the parent, in turns with this one) is about to use.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="ort-prof-"), "p")
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    sess = session()
    name = sess.get_inputs()[0].name

    def profile(calls):
        s = session(profile=True)
        for _ in range(calls + 1):
            s.run(None, {name: ids})
        trace = s.end_profiling()
        with open(trace) as f:
            events = json.load(f)
        per_op = collections.Counter()
        runs = 0
        for e in events:
            if e.get("cat") == "Session" and e.get("name") == "model_run":
                runs += 1
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                per_op[_op_key(e.get("args", {}))] += e["dur"] / 1e3
        runs = max(runs, 1)
        return {k: v / runs for k, v in per_op.items()}

    info = {"runtime": "onnxruntime", "version": ort.__version__, "bert_fusions": bool(args.bert_fusions),
            "int8": bool(args.quantize_int8)}
    ids = _ids(args)
    return (lambda: sess.run(None, {name: ids})), profile, info


def _op_key(args):
    """The profile key of one ONNX Runtime node: its op type, with ``:attention`` added for a MatMul between two
    activations of rank >= 3 (Q K^T and P V of an attention its BERT optimizer left unfused), so that attention
    is told apart from the Linear layers' MatMuls (whose weight, an initializer, is not among the inputs)."""
    op = args.get("op_name", "?")
    shapes = [next(iter(t.values()), []) for t in args.get("input_type_shape", [])]
    if op in ("MatMul", "FusedMatMul") and len(shapes) >= 2 and all(len(x) >= 3 for x in shapes[:2]):
        return op + ":attention"
    return op


def _deepsparse(args):
    import deepsparse

    engine = deepsparse.compile_model(args.model, batch_size=args.batch, num_cores=args.threads)
    ids = _ids(args)
    info = {"runtime": "deepsparse", "version": deepsparse.__version__}
    try:
        from deepsparse.cpu import cpu_architecture

        info["isa"] = str(cpu_architecture().isa)
    except Exception as exc:  # only informative
        info["isa"] = f"unknown ({type(exc).__name__})"
    return (lambda: engine([ids])), None, info


def _openvino(args):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(args.model, "CPU", {"INFERENCE_NUM_THREADS": str(args.threads),
                                                       "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    ids = _ids(args)
    info = {"runtime": "openvino", "version": ov.get_version()}
    return (lambda: request.infer([ids])), None, info


RUNTIMES = {"onnxruntime": _onnxruntime, "deepsparse": _deepsparse, "openvino": _openvino}


def _ids(args):
    return np.random.default_rng(args.batch).integers(0, args.vocab, size=(args.batch, args.seq), dtype=np.int64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runtime", choices=sorted(RUNTIMES))
    ap.add_argument("model", help="the .onnx file (input: input_ids [batch, seq] int64)")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bert-fusions", action="store_true", help="onnxruntime: its BERT graph optimizer first")
    ap.add_argument("--quantize-int8", action="store_true",
                    help="onnxruntime: its dynamic INT8 quantization (onnxruntime.quantization.quantize_dynamic) first")
    ap.add_argument("--num-heads", type=int, default=12)
    ap.add_argument("--hidden-size", type=int, default=768)
    args = ap.parse_args(argv)
    run, profile, info = RUNTIMES[args.runtime](args)
    run()
    run()
    print("ready " + json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "run":
            run()
            print("ok", flush=True)
        elif cmd[0] == "profile":
            if profile is None:
                print("profile {}", flush=True)
            else:
                print("profile " + json.dumps(profile(int(cmd[1]))), flush=True)
        else:
            print(f"unknown command {line.strip()!r}", file=sys.stderr, flush=True)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
