"""Smoke tests of the benchmark harness on toy shapes: the CSV schema, that every ratio comes from the rows of its
own case (one measurement), interleaved timing, cold-weight cycling, and the PASS/MISS logic of the summary.
No timing is asserted: the numbers of a toy run mean nothing."""

import importlib.util
import os
import sys

import pytest
import torch

import sparse
from benchmarks import attention, cpu_ops, e2e_bert, harness, report
from benchmarks.harness import COLUMNS, Contender, Timing
from sparse.runtime import native_dtype, onednn_unsupported

pytestmark = pytest.mark.skipif(not __import__("sparse")._ext.available(), reason="sparse._C not built")


def _check_case_ratios(rows):
    """Every row's baseline time is the time of a row of the same case, and ratio = baseline_s / median_s."""
    for case, case_rows in report.by_case(rows).items():
        base = {r["baseline"] for r in case_rows}
        assert len(base) == 1, f"{case}: one baseline per case, got {base}"
        label = base.pop()
        name = label[len("best_dense("):-1] if label.startswith("best_dense(") else label
        ref = [r for r in case_rows if r["backend"] == name]
        assert len(ref) == 1, f"{case}: baseline {label} must be exactly one row of the case"
        for r in case_rows:
            assert r["baseline_s"] == pytest.approx(ref[0]["median_s"], rel=1e-12)
            assert r["ratio"] == pytest.approx(r["baseline_s"] / r["median_s"], rel=1e-9)
            assert r["ideal_ratio"] == pytest.approx(1.0 / r["density"], rel=1e-6)
            assert r["p10_s"] <= r["median_s"] <= r["p90_s"]
        if label.startswith("best_dense("):
            dense = [r for r in case_rows if r["format"] == "dense" and r["dtype"] == case_rows[0]["dtype"]]
            assert ref[0]["median_s"] == pytest.approx(min(r["median_s"] for r in dense), rel=1e-12)


def test_cpu_ops_tiny_csv_schema_and_ratios(tmp_path):
    p = cpu_ops.PRESETS["tiny"]
    rows, skipped = cpu_ops.run(p, str(tmp_path), progress=False)
    assert not [s for s in skipped if "WRONG RESULT" in s], skipped
    back = harness.read_csv(os.path.join(tmp_path, "cpu_ops.csv"))
    assert len(back) == len(rows) > 0
    with open(os.path.join(tmp_path, "cpu_ops.csv")) as f:
        assert f.readline().strip().split(",") == COLUMNS
    for r in back:
        for col in (
            "machine",
            "cpu_features",
            "isa",
            "torch",
            "git_rev",
            "op",
            "backend",
            "format",
            "dtype",
            "weights",
        ):
            assert r[col] != "", f"column {col} empty in {r['case']} {r['backend']}"
        assert r["threads"] >= 1 and r["repeats"] == p.rounds
    _check_case_ratios(back)

    ops = {(r["op"], r["weights"]) for r in back}
    assert {("linear", "hot"), ("linear", "cold"), ("grad_input", "hot"), ("sddmm", "hot")} <= ops
    fp32 = [r for r in back if r["case"] == "linear|96x64|T8|float32|2t|hot"]
    backends = {r["backend"] for r in fp32}
    # every baseline the CPU kernel targets compare with sits in the same case as our kernel
    assert {
        "F.linear",
        "onednn_prepacked",
        "sparsekern",
        "sparse.linear",
        "torch.sparse",
        "torch.sparse:F.linear",
        "scipy",
    } <= backends
    assert {r["format"] for r in fp32 if r["backend"] == "torch.sparse"} == {"csr", "torch_bsr"}
    assert any(r["threads"] == 1 for r in fp32), "1-thread scaling contender missing"
    bf16 = [r for r in back if r["dtype"] == "bfloat16"]
    assert {"F.linear", "sparsekern"} <= {r["backend"] for r in bf16}
    # oneDNN's bf16 path runs where the CPU allows it, and is otherwise listed as skipped, with the reason
    if onednn_unsupported(torch.bfloat16) is None:
        assert "onednn_prepacked" in {r["backend"] for r in bf16}
    else:
        assert any("bfloat16" in s and "onednn: RuntimeError: not run on this CPU" in s for s in skipped), skipped
    # the summary and plots are produced from these rows
    paths = report.write_report(back, str(tmp_path), skipped=skipped)
    assert all(os.path.getsize(x) > 0 for x in paths) and len(paths) == 3


@pytest.mark.slow  # end-to-end model timings: ~20 s on a busy machine
def test_e2e_tiny_rows(tmp_path):
    rows, skipped = e2e_bert.run(e2e_bert.PRESETS["tiny"], str(tmp_path), progress=False)
    # bf16 contenders are left out, with a line saying why, only where this CPU has no native bf16
    expected = [] if native_dtype(torch.bfloat16) else [s for s in skipped if s.startswith("bfloat16 contenders")]
    assert skipped == expected and len(expected) <= 1, skipped
    back = harness.read_csv(os.path.join(tmp_path, "e2e_bert.csv"))
    assert {r["op"] for r in back} == {"bert_forward", "bert_train_step", "bert_forward_remainder"}
    assert {(r["format"], r["block"]) for r in back} >= {("dense", ""), ("bsr", "32x32"), ("balanced", "bank32/keep8")}
    _check_case_ratios_e2e(back)
    # the compiled sparse models are contenders (tiny: compile off), and each profiled model has a remainder row
    remainder = {r["backend"]: r for r in back if r["op"] == "bert_forward_remainder"}
    assert {"eager_fp32", "onednn_float32", "block:0.75:float32", "balanced:0.75:float32:fused",
            "block:0.75:float32:fused+qkv"} <= set(remainder)
    assert {("bert_forward", "sparse.sparsify(fused gelu+qkv)"), ("bert_train_step", "sparse.sparsify(fused gelu+qkv)")
            } <= {(r["op"], r["backend"]) for r in back}
    assert all(0 < r["median_s"] < 10 for r in remainder.values())
    profile = open(os.path.join(tmp_path, "e2e_profile.md")).read()
    assert "our sparse ops" in profile and all(f"| {name} |" in profile for name in remainder)
    # every model raced the attention implementations, SDPA's CPU backends apart, and its notes keep each time
    from sparse.evaluate import ATTENTION_IMPLEMENTATIONS

    for r in back:
        if r["op"] == "bert_forward":
            winner = r["notes"].split(" ")[1]
            assert winner in ATTENTION_IMPLEMENTATIONS and f"| {r['backend']} | {winner} |" in profile or (
                r["backend"] not in remainder), (r["notes"], profile)
            assert all(f"{impl} " in r["notes"] for impl in ATTENTION_IMPLEMENTATIONS), r["notes"]


def _check_case_ratios_e2e(rows):
    for case_rows in report.by_case(rows).values():
        eager = [r for r in case_rows if r["backend"] == "eager_fp32"]
        assert len(eager) == 1
        for r in case_rows:
            assert r["baseline"] == "eager_fp32"
            assert r["ratio"] == pytest.approx(eager[0]["median_s"] / r["median_s"], rel=1e-9)


def test_attention_tiny_rows_and_summary(tmp_path):
    """benchmarks.attention: our kernel and every SDPA form that takes the case, checked against float64 and timed
    in one measurement; the summary's ratio is the fastest SDPA form's time over ours."""
    attention.main(["--preset", "tiny", "--out", str(tmp_path)])
    rows = harness.read_csv(str(tmp_path / "attention.csv"))
    assert {r["backend"] for r in rows} == {"sparsekern", "sdpa", "sdpa_math", "sdpa_flash"}
    assert len({r["case"] for r in rows}) == 1 and all(r["op"] == "attention" and r["median_s"] > 0 for r in rows)
    ours = next(r for r in rows if r["backend"] == "sparsekern")
    best = min((r for r in rows if r["backend"] != "sparsekern"), key=lambda r: r["median_s"])
    assert ours["baseline"] == f"best_dense({best['backend']})"
    assert ours["ratio"] == pytest.approx(best["median_s"] / ours["median_s"])
    text = (tmp_path / "summary.md").read_text()
    assert f"| {ours['ratio']:.2f} |" in text and "| minilm | 1 | 16 | float32 | 1 |" in text


def test_measure_interleaves_in_steady_state():
    calls = []
    cs = [Contender(n, (lambda n=n: calls.append(n))) for n in "abc"]
    t = harness.measure(cs, rounds=4, min_sample_s=1e-9, warmup=1)
    assert set(t) == {"a", "b", "c"} and all(x.repeats == 4 for x in t.values())
    assert calls[:6] == list("aabbcc"), "warm-up and calibration of each contender come first"
    timed = calls[6:]  # then per sample: 1 untimed + 1 timed call (1e-9 s asks for one call per sample)
    order = [timed[i] for i in range(0, len(timed), 2)]
    assert timed[0::2] == timed[1::2], "each sample must follow an untimed call of the same contender"
    assert order == list("abc" "bca" "cab" "abc"), "rounds must interleave contenders in a rotating order"
    with pytest.raises(ValueError, match="unique"):
        harness.measure([cs[0], cs[0]])


def test_cold_copies_exceed_last_level_cache(monkeypatch):
    for llc, ram in ((32 << 20, 24 << 30), (480 << 20, 24 << 30), (64 << 20, 1 << 30)):
        monkeypatch.setattr(harness, "last_level_cache_bytes", lambda llc=llc: llc)
        monkeypatch.setattr(harness, "physical_memory_bytes", lambda ram=ram: ram)
        total = harness.cold_bytes()
        assert total == min(2 * llc, ram // 32), (llc, ram, total)
        for nbytes in (1000, 768 * 768 * 4, 3 * llc):
            n = harness.cold_copies(nbytes)
            assert n >= 2 and n * nbytes >= total
            assert n == 2 or (n - 1) * nbytes < total, "no more copies than the budget needs"
    seen = []
    fn = harness.cycling([1, 2, 3], seen.append)
    for _ in range(7):
        fn()
    assert seen == [1, 2, 3, 1, 2, 3, 1]


def test_write_csv_rejects_columns_outside_the_schema(tmp_path):
    with pytest.raises(ValueError, match="outside the schema"):
        harness.write_csv(str(tmp_path / "x.csv"), [{"op": "linear", "speed": 1}])


@pytest.mark.parametrize("last", ["ideal_ratio", "git_rev", "timestamp", "notes"])
def test_read_csv_takes_a_header_of_every_schema_so_far(tmp_path, last):
    """CSVs written before the notes column and before the accuracy columns read back with those columns empty;
    any other header is refused, naming the schema."""
    import csv

    old = COLUMNS[:COLUMNS.index(last) + 1]
    path = tmp_path / "old.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old)
        w.writeheader()
        w.writerow({k: "1" if k in harness._NUMERIC else "x" for k in old})
    if last in ("timestamp", "notes"):
        (row,) = harness.read_csv(str(path))
        assert list(row) == COLUMNS and row["median_s"] == 1.0
        assert row["cosine"] == "" and row["top1_agreement"] == ""
    else:
        with pytest.raises(ValueError, match="are not the harness schema"):
            harness.read_csv(str(path))


def _rows(case, ours_s, dense_s, **ours_info):
    cs = [
        Contender(
            "F.linear", lambda: None, {"backend": "F.linear", "format": "dense", "dense_ref": True, "density": 1.0}
        ),
        Contender(
            "onednn",
            lambda: None,
            {"backend": "onednn_prepacked", "format": "dense", "dense_ref": True, "density": 1.0},
        ),
        Contender("ours", lambda: None, {"backend": "sparsekern", **ours_info}),
    ]
    t = {"F.linear": Timing(2 * dense_s, 0, 0, 1), "onednn": Timing(dense_s, 0, 0, 1), "ours": Timing(ours_s, 0, 0, 1)}
    common = {"op": "linear", "dtype": "float32", "shape": "768x768", "out_features": 768, "in_features": 768,
              "tokens": 128, "threads": 2, "weights": "hot"}
    return harness.make_rows("cpu_ops", case, common, cs, t, "best_dense")


def test_summary_pass_and_miss_against_the_targets():
    # 90% block 32: target 0.9/0.1 = 9x against the best dense (oneDNN here, 1.0 s)
    passing = _rows("a", 1.0 / 9.5, 1.0, format="bsr", block="32x32", density=0.1)
    missing = _rows("b", 1.0 / 8.0, 1.0, format="bsr", block="32x32", density=0.1)
    assert passing[-1]["baseline"] == "best_dense(onednn_prepacked)" and passing[-1]["ratio"] == pytest.approx(9.5)
    table = report.kernel_target_tables(passing + missing)[0]
    assert table.total == 2 and table.passed == 1
    md = report.summary_markdown(passing + missing)
    assert "| PASS |" in md and "**MISS**" in md and "9.00x" in md


def test_main_rejects_unknown_suite():
    from benchmarks import run

    with pytest.raises(SystemExit):
        run.main(["--suite", "nope"])


def test_importable_as_sparse_benchmarks():
    """``python -m sparse bench`` reaches the harness as ``sparse.benchmarks.main`` in a checkout and installed."""
    import sparse
    import sparse.benchmarks
    import sparse.benchmarks.harness

    assert callable(sparse.benchmarks.main)
    here = os.path.dirname(os.path.abspath(sparse.__file__))
    origin = os.path.abspath(sparse.benchmarks.__file__)
    assert origin in (os.path.join(here, "benchmarks", "__init__.py"),
                      os.path.join(os.path.dirname(here), "benchmarks", "__init__.py"))
    assert sparse.benchmarks.harness.COLUMNS == COLUMNS


def test_a_wrong_contender_is_left_out_not_timed():
    case = cpu_ops.Case("linear", (4, 4), 2, "float32", 1, "hot")
    ref = torch.ones(2, 4, dtype=torch.float64)
    skipped = []
    assert cpu_ops._try(Contender("right", lambda: torch.ones(2, 4), {}, ref), skipped, case)
    assert not cpu_ops._try(Contender("wrong", lambda: torch.ones(2, 4) * 1.01, {}, ref), skipped, case)
    assert not cpu_ops._try(Contender("transposed", lambda: torch.ones(4, 2), {}, ref), skipped, case)
    assert len(skipped) == 2 and all("WRONG RESULT" in s for s in skipped)


def test_pick_attention_keeps_the_faster_and_rejects_unknown(monkeypatch):
    from sparse import evaluate, timing

    class FakeModel(torch.nn.Module):  # a transformers-like switch; "eager" made slow by the call below
        impl = "sdpa"

        def set_attn_implementation(self, impl):
            self.impl = impl

    m = FakeModel()
    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock) * (1.0 if m.impl == "sdpa" else 5.0))
    winner, secs = evaluate.pick_attention(m, lambda: None, calls=2)
    assert winner == "sdpa" and m.impl == "sdpa" and secs["eager"] > secs["sdpa"]
    with pytest.raises(ValueError, match="'flash': expected one of"):
        evaluate.set_attention(m, "flash")
    assert evaluate.pick_attention(torch.nn.Linear(2, 2), lambda: None) == (None, {})


def test_a_baseline_this_cpu_cannot_run_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """As on a CPU without AVX512BW/VL/DQ, where torch refuses oneDNN's bf16 linear and bf16 is not native: the
    op benchmark lists the oneDNN bf16 contenders as skipped (never a crash) and the e2e benchmark leaves the bf16
    models out, both saying why in summary.md."""
    from benchmarks import baselines

    reason = "oneDNN pre-packed linear in torch.bfloat16: bf16 path needs the cpu support avx_ne_convert or avx512bw"
    monkeypatch.setattr(baselines, "onednn_unsupported", lambda dt: reason if dt == torch.bfloat16 else None)
    rows, skipped = cpu_ops.run(cpu_ops.PRESETS["tiny"], str(tmp_path), progress=False)
    bf16 = [r for r in rows if r["dtype"] == "bfloat16"]
    assert bf16 and "onednn_prepacked" not in {r["backend"] for r in bf16}
    assert {"F.linear", "sparsekern"} <= {r["backend"] for r in bf16}
    assert "onednn_prepacked" in {r["backend"] for r in rows if r["dtype"] == "float32"}
    refused = [s for s in skipped if "not run on this CPU" in s]
    assert refused and all("bfloat16" in s for s in refused), skipped
    report.write_report(rows, str(tmp_path), skipped=skipped, plots=False)
    summary = open(os.path.join(tmp_path, "summary.md")).read()
    assert "bf16 path needs the cpu support" in summary and "native dtypes" in summary

    monkeypatch.setattr(e2e_bert, "native_dtype", lambda dt: dt != torch.bfloat16)
    rows, skipped = e2e_bert.run(e2e_bert.PRESETS["tiny"], str(tmp_path), progress=False)
    assert {r["dtype"] for r in rows} == {"float32"}
    assert len(skipped) == 1 and skipped[0].startswith("bfloat16 contenders: not run"), skipped



# ---- the GPU benchmark's plumbing, on CPU tensors under the Triton interpreter (the GPU run times it for real) ----
_needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="plumbing check on CPU tensors (TRITON_INTERPRET=1, set by conftest.py without a GPU)",
)
_TINY = {"tiny 128x256": (128, 256)}
_ENV = {"gpu": "cpu", "capability": "0.0", "torch": torch.__version__, "triton": "", "cuda": "", "host": "", "date": ""}


def _gpu_triton(monkeypatch):
    pytest.importorskip("triton")
    from benchmarks import gpu_triton

    monkeypatch.setattr(gpu_triton, "bench", lambda fn: (fn(), 1.0)[1])  # one call, no CUDA timing
    # fp32: the interpreter's bf16 tl.dot is wrong (tests/test_triton.py patches it for its own module only).
    monkeypatch.setattr(gpu_triton, "DTYPE", torch.float32)
    monkeypatch.setattr(gpu_triton, "torch_bsr_times", lambda W, block, x: {"torch_bsr_linear_ms": None,
                                                                               "torch_bsr_dense_mm_ms": None})
    return gpu_triton


@_needs_interpreter
def test_gpu_triton_writes_each_row_as_measured_and_goes_on_after_a_failure(tmp_path, monkeypatch):
    import csv

    gpu_triton = _gpu_triton(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu_triton.bsr, "bsr_sddmm", broken)
    path = tmp_path / "gpu_triton.csv"
    seen = []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=gpu_triton.FIELDS, restval="")
        writer.writeheader()

        def flush():
            f.flush()
            seen.append(sum(1 for _ in open(path)) - 1)  # rows on disk at each flush

        rows, errors = gpu_triton.run(16, torch.device("cpu"), _TINY, _ENV, writer, flush)
    # block 64: fwd + grad_input per density, then the sddmm raises (the case stops there, the next one runs);
    # block 32: fwd per density; balanced: fwd, grad_input, sddmm.
    assert len(errors) == 3 and all("planted failure" in e for e in errors)
    assert [(r["op"], r["pattern"]) for r in rows].count(("fwd", "block 32")) == 3
    assert len(rows) == 3 * 2 + 3 + 3
    assert seen == list(range(1, len(rows) + 1))
    with open(path, newline="") as f:
        on_disk = list(csv.DictReader(f))
    assert len(on_disk) == len(rows) and list(on_disk[0]) == gpu_triton.FIELDS
    assert all(float(r["max_rel_err"]) < 1e-5 for r in on_disk), [r["max_rel_err"] for r in on_disk]


@_needs_interpreter
def test_gpu_triton_starts_no_case_after_its_deadline(monkeypatch):
    gpu_triton = _gpu_triton(monkeypatch)
    rows, errors = gpu_triton.run(16, torch.device("cpu"), _TINY, _ENV, deadline=0.0)
    assert rows == [] and errors == []


def test_cuda_event_timing_needs_a_cuda_device():
    from sparse import timing

    for device in (None, "cpu", torch.zeros(1)):
        with pytest.raises(ValueError, match="cuda_events=True needs a CUDA device"):
            timing.interleaved({"f": lambda: None}, repeats=1, device=device, cuda_events=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_event_timing_as_the_gpu_benchmarks_use_it():
    """benchmarks/gpu_cuda.py's loop: rotating rounds, a presample before each sample, CUDA events."""
    from sparse import timing

    x = torch.randn(512, 512, device="cuda")
    samples = timing.interleaved({"mm": lambda: x @ x, "add": lambda: x + 1}, repeats=3, warmup=1, device="cuda",
                                 rotate=True, presample=True, cuda_events=True)
    assert list(samples) == ["mm", "add"] and all(len(s) == 3 and s.min > 0 for s in samples.values())
    assert timing.sample(lambda: x @ x, repeats=2, device=x, cuda_events=True, calls=2).min > 0


def test_peers_configuration_and_densified_model():
    """benchmarks.peers: NAME=PYTHON pairs checked; a densified sparse model computes what the sparse one does."""
    from benchmarks import peers

    with pytest.raises(ValueError, match="expected NAME=PYTHON with NAME one of"):
        peers.configured("tensorrt=/usr/bin/python3")
    with pytest.raises(ValueError, match="is not an executable Python"):
        peers.configured("deepsparse=/nonexistent/python")
    got = peers.configured(f"deepsparse={sys.executable}")
    assert got["deepsparse"] == sys.executable
    assert all(name in " ".join(peers.missing({})) for name in peers.RUNTIMES)
    model = e2e_bert.build_model(e2e_bert.PRESETS["tiny"].config)
    sp = e2e_bert.sparsify(model, "block", 0.75)
    dense = sparse.densify(sp)
    assert not any(isinstance(m, sparse.nn.SparseLinear) for m in dense.modules())
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(e2e_bert.forward_fn(dense, ids)(), e2e_bert.forward_fn(sp, ids)())
    fused = e2e_bert.sparsify(model, "block", 0.75, fuse=True)  # the GELU comes back after the dense layer
    torch.testing.assert_close(e2e_bert.forward_fn(sparse.densify(fused), ids)(), e2e_bert.forward_fn(fused, ids)())


@pytest.mark.skipif(importlib.util.find_spec("deepsparse") is not None, reason="deepsparse importable here")
def test_peer_that_cannot_start_says_why(tmp_path):
    from benchmarks import peers

    with pytest.raises(RuntimeError, match="deepsparse did not start: .*No module named 'deepsparse'"):
        peers.Peer("deepsparse", sys.executable, str(tmp_path / "none.onnx"), batch=1, seq=8, vocab=10, threads=1)


@pytest.mark.slow  # exports a model and starts a runtime
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="onnxruntime and onnx are optional (peers only)")
def test_onnxruntime_peer_runs_and_profiles(tmp_path):
    from benchmarks import peers

    model = e2e_bert.build_model(e2e_bert.PRESETS["tiny"].config)
    path = peers.export_bert(sparse.densify(e2e_bert.sparsify(model, "block", 0.75)), 1, 16, str(tmp_path / "m.onnx"))
    with peers.Peer("onnxruntime", sys.executable, path, batch=2, seq=16, vocab=512, threads=1) as peer:
        peer()
        ops = peer.profile(2)
    assert ops and any(k in ops for k in e2e_bert.ORT_MATMUL_OPS) and all(v >= 0 for v in ops.values())




def _e2e_run(times):
    """Synthetic e2e rows, one case per batch: {batch: {contender: seconds}} (eager_fp32 the baseline)."""
    infos = {
        "eager_fp32": {"backend": "eager_fp32", "format": "dense", "density": 1.0, "dtype": "float32"},
        "block": {"backend": "sparse.sparsify", "format": "bsr", "block": "32x32", "density": 0.1, "dtype": "float32"},
        "balanced": {"backend": "sparse.sparsify", "format": "balanced", "block": "bank32/keep3", "density": 3 / 32,
                     "dtype": "float32"},
        "ort_old": {"backend": "onnxruntime 1.17.0", "format": "dense", "density": 1.0, "dtype": "float32"},
        "ort_new": {"backend": "onnxruntime 1.19.0", "format": "dense", "density": 1.0, "dtype": "float32"},
        "new_only": {"backend": "sparse.compile(fused gelu)", "format": "bsr", "block": "32x32", "density": 0.1,
                     "dtype": "float32"},
    }
    rows = []
    for batch, per in times.items():
        cs = [Contender(n, lambda: None, infos[n]) for n in per]
        t = {n: Timing(s, s, s, 3) for n, s in per.items()}
        common = {"op": "bert_forward", "shape": "BERT-base seq 128", "tokens": 128 * batch, "threads": 2,
                  "weights": "hot", "out_features": 768, "in_features": 768}
        rows += harness.make_rows("e2e_bert", f"bert_forward|batch{batch}|seq128|2t", common, cs, t, "eager_fp32")
    return rows


def test_compare_with_an_earlier_run_flags_rows_that_lost_ground(tmp_path, capsys):
    from benchmarks import run

    old = _e2e_run({1: {"eager_fp32": 1.0, "block": 0.25, "balanced": 0.5, "ort_old": 0.8},
                    8: {"eager_fp32": 8.0, "block": 2.0}})
    # batch 1: the block model went from 4x to 3.3x eager (-17%: worse), balanced from 2x to 1.92x (-4%: noise),
    # ONNX Runtime (upgraded) as before; batch 8: the whole run 1.5x slower (a busier machine), ratios kept.
    new = _e2e_run({1: {"eager_fp32": 1.0, "block": 0.30, "balanced": 0.52, "ort_new": 0.8, "new_only": 0.2},
                    8: {"eager_fp32": 12.0, "block": 3.0}})
    (tmp_path / "old").mkdir()
    harness.write_csv(str(tmp_path / "old" / "e2e_bert.csv"), old)
    harness.write_csv(str(tmp_path / "new.csv"), new)

    changes = report.compare_runs(harness.read_csv(str(tmp_path / "new.csv")), report.read_run(str(tmp_path / "old")))
    by = {(c.new["case"].split("|")[1], c.new["backend"], c.new["format"]): c for c in changes}
    assert len(changes) == 6 and not any(c.new["backend"].startswith("sparse.compile") for c in changes)
    block1 = by[("batch1", "sparse.sparsify", "bsr")]
    assert block1.time_ratio == pytest.approx(1.2) and block1.baseline_change == pytest.approx(0.25 / 0.30)
    assert block1.worse()
    assert not by[("batch1", "sparse.sparsify", "balanced")].worse()
    assert by[("batch1", "onnxruntime 1.19.0", "dense")].time_ratio == pytest.approx(1.0)
    block8 = by[("batch8", "sparse.sparsify", "bsr")]
    assert block8.time_ratio == pytest.approx(1.5) and not block8.worse()
    assert [c for c in changes if c.worse()] == [block1]
    assert by[("batch1", "sparse.sparsify", "balanced")].worse(margin=0.03)  # the margin is a parameter
    other = report.Change({**block1.new, "baseline": "onnxruntime 1.32.0"}, block1.old)
    assert not other.same_baseline and not other.worse()  # ratios to different baselines are not judged
    assert report.Change({**block1.new, "baseline": "onnxruntime 1.32.0"},
                         {**block1.old, "baseline": "onnxruntime 1.17.0"}).worse()

    # the command line: python -m benchmarks --report NEW.csv --compare OLD_DIR
    assert run.main(["--report", str(tmp_path / "new.csv"), "--compare", str(tmp_path / "old"),
                     "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    md = open(tmp_path / "out" / "compare.md").read()
    assert md in printed and "6 rows in both runs" in md and "1 lost more than 10%" in md
    worse = [line for line in md.splitlines() if "**WORSE**" in line]
    assert len(worse) == 1 and "batch1" in worse[0] and "bsr" in worse[0] and "| 1.20 |" in worse[0]
    with pytest.raises(SystemExit):
        run.main(["--report", str(tmp_path / "new.csv"), "--compare", str(tmp_path / "nowhere")])


def test_profile_states_the_attention_gap_to_onnxruntime():
    from benchmarks import peer_runner

    # ONNX Runtime's profile keys: a MatMul between two rank-4 activations is attention, one with a weight is not
    shape = lambda *dims: {"float": list(dims)}  # noqa: E731
    qk = [shape(1, 2, 8, 4), shape(1, 2, 4, 8)]
    assert peer_runner._op_key({"op_name": "MatMul", "input_type_shape": qk}) == "MatMul:attention"
    assert peer_runner._op_key({"op_name": "FusedMatMul", "input_type_shape": qk}) == "FusedMatMul:attention"
    assert peer_runner._op_key({"op_name": "MatMul", "input_type_shape": [shape(1, 8, 16)]}) == "MatMul"
    assert peer_runner._op_key({"op_name": "MatMul", "input_type_shape": [shape(1, 8, 16), shape(16, 16)]}) == "MatMul"
    ops = {"MatMul": 10.0, "FusedMatMul:attention": 2.0, "MatMul:attention": 1.0, "Softmax": 1.0, "Add": 0.5}
    assert e2e_bert.ort_attention_ms(ops) == pytest.approx(4.0)

    S = e2e_bert.Split
    split = [S("eager_fp32", 30.0, 20.0, 0.0, 6.0, [], "sdpa"),
             S("block:0.9:float32", 12.0, 4.0, 3.0, 5.0, [], "eager"),
             S("compile_float32", 20.0, 15.0, 0.0, 1.0, [], "compiled"),
             S("onnxruntime:dense", 25.0, 20.0, 0.0, 4.0, [("MatMul", 20.0)], "ORT fusions: attention unfused")]
    text = "\n".join(e2e_bert._profile_markdown(split, 8, e2e_bert.PRESETS["tiny"]))
    assert "**Attention against ONNX Runtime, batch 8**: onnxruntime:dense 4.0 ms (softmax and attention" in text
    assert "- eager_fp32 (`sdpa`): 6.0 ms, **1.50x** ONNX Runtime's" in text
    assert "- block:0.9:float32 (`eager`): 5.0 ms, **1.25x**" in text
    assert "- compile_float32 (`compiled`): 1.0 ms, **0.25x** ONNX Runtime's (compiled: attention partly" in text
    split[-1] = S("onnxruntime:dense", 25.0, 20.0, 0.0, 4.0, [], "ORT fusions: fused Attention")
    assert "4.0 ms (its fused Attention op)" in "\n".join(e2e_bert.attention_gap(split, 8))
    assert "not measured (ONNX Runtime did not run" in "\n".join(e2e_bert.attention_gap(split[:-1], 1))


@pytest.mark.slow  # the tiny preset with ONNX Runtime as a peer: exports the model and starts the runtime
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="onnxruntime and onnx are optional (peers only)")
def test_e2e_tiny_profile_with_onnxruntime_states_the_attention_gap(tmp_path, monkeypatch):
    from dataclasses import replace

    monkeypatch.delenv("SPARSEKERN_PEERS", raising=False)
    p = replace(e2e_bert.PRESETS["tiny"], peers=True, train_batches=[], patterns=["block"])
    rows, skipped = e2e_bert.run(p, str(tmp_path), progress=False)
    assert not [s for s in skipped if s.startswith(("onnxruntime", "peers:"))], skipped
    assert any(r["backend"].startswith("onnxruntime ") for r in rows if r["op"] == "bert_forward")
    profile = open(os.path.join(tmp_path, "e2e_profile.md")).read()
    gap = profile[profile.index("**Attention against ONNX Runtime, batch 1**"):]
    assert "onnxruntime:dense" in gap.splitlines()[0] and " ms (" in gap.splitlines()[0]
    ours = [line for line in gap.splitlines()[2:] if line.startswith("- ") and "ONNX Runtime's" in line]
    assert {line.split(" ")[1] for line in ours} >= {"eager_fp32", "block:0.75:float32"}
    assert all("x** ONNX Runtime's" in line for line in ours)
