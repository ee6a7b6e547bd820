"""The command line on a tiny random BERT (built here, no downloads): sparsify end to end with its report, the
error paths, info, bench forwarding, and the pieces sparsify is made of (corpus, metrics, masks, distillation,
the pre-packed dense baseline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import sparse  # noqa: E402
from sparse import cli, corpus, distill, evaluate  # noqa: E402
from tests.helpers import assert_close_to_ref, tiny_bert_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a machine shared by many processes, two OpenMP threads waiting on each other make
    a tiny model's training step tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A random 2-layer BertModel (hidden 64, intermediate 128) and a WordPiece tokenizer, saved as a Hugging
    Face model directory (tests/helpers.py tiny_bert_dir)."""
    return tiny_bert_dir(str(tmp_path_factory.mktemp("tiny-bert")))


def _run(capsys, *argv) -> tuple:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


FAST = ("--heldout", "40", "--seq", "16", "--latency-rounds", "2", "--threads", "1", "--no-progress")


def _check_report(report: dict, n_layers: int) -> None:
    size = report["size"]
    assert size["sparse"]["weight_bytes"] < size["dense"]["weight_bytes"]
    assert size["sparse"]["parameters"] < size["dense"]["parameters"]
    assert size["pruned_layers"]["sparse_bytes"] < size["pruned_layers"]["dense_bytes"]
    for stage in ("before_recovery", "after_recovery"):
        acc = report["accuracy"][stage]
        assert -1.0 <= acc["cosine"] <= 1.0
        assert 0.0 <= acc["top1_agreement"] <= 1.0
    lat = report["latency"]
    for name, m in lat["models"].items():
        for b in (1, 8):
            assert m[f"batch{b}_ms"] > 0
            assert m[f"batch{b}_seq_per_s"] == pytest.approx(b / (m[f"batch{b}_ms"] / 1e3))
    assert lat["best_dense"] in ("dense_eager", "dense_onednn_prepacked", "dense_compiled")
    for b in (1, 8):  # attention raced per batch and (eager) model, the winner is the faster one
        per = lat["attention"][f"batch{b}"]
        assert set(per) == {name for name in lat["models"] if not name.endswith("_compiled")}
        for a in per.values():
            # transformers' sdpa and eager, SDPA with its math and flash CPU backends forced, and ours
            assert set(a["ms"]) == {"sdpa", "eager", "sdpa_math", "sdpa_flash", "sparsekern"}
            assert a["implementation"] == min(a["ms"], key=a["ms"].get)
    assert lat["speedup_batch8"] == pytest.approx(
        lat["models"][lat["best_dense"]]["batch8_ms"] / lat["models"][lat["best_sparse"]]["batch8_ms"])
    layers = report["layers"]["layers"]
    swapped = [layer for layer in layers if layer["status"] == "converted"]
    assert len(swapped) == n_layers  # --no-skip-if-slower: every encoder Linear
    for layer in swapped:
        assert layer["dense_ms"] > 0 and layer["sparse_ms"] > 0
        assert layer["bytes_after"] < layer["bytes_before"]
        assert layer["sparsity"] == pytest.approx(report["pattern_args"]["sparsity"])


def test_sparsify_block_with_recovery(tiny_model, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, stdout, err = _run(capsys, "sparsify", "--model", tiny_model, "--pattern", "block", "--block", "32",
                           "--sparsity", "0.5", "--recover-seconds", "2", "--no-skip-if-slower",
                           "--out", out, *FAST)  # activations fused by default
    assert rc == 0, err
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    _check_report(report, n_layers=2 * 6)
    rec = report["recovery"]
    assert rec["steps"] >= 1 and rec["world_size"] == 1 and "per_rank_batch" not in rec
    assert rec["steps_per_second"] == pytest.approx(rec["steps"] / rec["seconds"])
    assert f"{rec['steps_per_second']:.2f} steps/s on 1 process," in stdout
    fused = report["layers"]["fusions"]
    assert sorted(f["linear"] for f in fused) == [f"encoder.layer.{i}.intermediate.dense" for i in range(2)]
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    assert md.strip() == stdout.strip()
    assert "top-1 retrieval agreement" in md and "Speedup of the best sparse" in md

    # The saved model reloads onto a fresh dense model and computes what the report measured: the same
    # embeddings, and a kept-block pattern of exactly 50% in every layer.
    tok = transformers.AutoTokenizer.from_pretrained(out)
    fresh = transformers.BertModel(transformers.BertConfig.from_pretrained(tiny_model))
    loaded = sparse.load(fresh, out).eval()
    text = corpus.load(n_heldout=40)
    dense = transformers.AutoModel.from_pretrained(tiny_model).eval()
    got = evaluate.agreement(evaluate.embed(dense, tok, text.heldout), evaluate.embed(loaded, tok, text.heldout))
    assert got["cosine"] == pytest.approx(report["accuracy"]["after_recovery"]["cosine"], abs=1e-5)
    assert got["top1_agreement"] == report["accuracy"]["after_recovery"]["top1_agreement"]
    blocks = [m for m in loaded.modules() if isinstance(m, sparse.BlockSparseLinear)]
    assert len(blocks) == 12
    for m in blocks:
        assert m.sparsity == pytest.approx(0.5)


def test_sparsify_unstructured_with_recovery(tiny_model, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, stdout, err = _run(capsys, "sparsify", "--model", tiny_model, "--pattern", "unstructured", "--sparsity",
                           "0.875", "--recover-seconds", "1", "--no-skip-if-slower", "--out", out, *FAST)
    assert rc == 0, err
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["pattern"] == "unstructured" and report["pattern_args"] == {"sparsity": 0.875}
    _check_report(report, n_layers=2 * 6)  # 0.875 of each layer dropped: 16 x 1/8 = 2 bytes per dense fp32 weight
    assert {layer["pattern"] for layer in report["layers"]["layers"] if layer["status"] == "converted"} == {
        "unstructured"}
    assert report["recovery"]["steps"] >= 1
    assert stdout.startswith("# sparsekern report: tiny-bert") and "unstructured (sparsity 0.875)" in stdout
    assert "| unstructured | 0.875 |" in stdout

    # The saved model reloads as 1x1-block layers keeping exactly 1/8 of each weight (the SparseGPT walk picks
    # them per group of 128 columns; these layers have at most 128), and computes the embeddings reported.
    tok = transformers.AutoTokenizer.from_pretrained(out)
    loaded = sparse.load(transformers.BertModel(transformers.BertConfig.from_pretrained(tiny_model)), out).eval()
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, sparse.BlockSparseLinear)}
    assert len(layers) == 12 and all(n.startswith("encoder.") for n in layers)
    for m in layers.values():
        assert m.block == (1, 1) and m.values.shape[0] == m.in_features * m.out_features // 8
    text = corpus.load(n_heldout=40)
    dense = transformers.AutoModel.from_pretrained(tiny_model).eval()
    got = evaluate.agreement(evaluate.embed(dense, tok, text.heldout), evaluate.embed(loaded, tok, text.heldout))
    assert got["cosine"] == pytest.approx(report["accuracy"]["after_recovery"]["cosine"], abs=1e-5)


@pytest.mark.slow  # torch.compile of two models at two batch sizes
def test_sparsify_times_compiled_models(tiny_model, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, stdout, err = _run(capsys, "sparsify", "--model", tiny_model, "--pattern", "block", "--block", "32",
                           "--sparsity", "0.5", "--no-skip-if-slower", "--compile", "--out", out, *FAST)
    assert rc == 0, err
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    _check_report(report, n_layers=2 * 6)
    assert {"dense_compiled", "sparse_compiled"} <= set(report["latency"]["models"])
    assert stdout.count("sparse.compile (torch.compile, freezing)") >= 2


def test_sparsify_balanced_bf16_no_recovery(tiny_model, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, stdout, err = _run(capsys, "sparsify", "--model", tiny_model, "--pattern", "balanced", "--bank", "32",
                           "--keep", "8", "--dtype", "bfloat16", "--no-skip-if-slower", "--no-fuse-activations",
                           "--fuse-qkv", "--out", out, *FAST)
    assert rc == 0, err
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["layers"]["fusions"] == []
    # --no-skip-if-slower: query, key and value of both layers as one op, timed for the report
    qkv = report["layers"]["qkv_fusions"]
    assert [(f["attention"], f["applied"]) for f in qkv] == [(f"encoder.layer.{i}.attention.self", True)
                                                             for i in range(2)]
    assert all(f["fused_ms"] > 0 and f["separate_ms"] > 0 for f in qkv)
    assert "Query, key and value as one sparse op" in open(os.path.join(out, "report.md")).read()
    reloaded = sparse.load(None, out)
    assert type(reloaded.encoder.layer[0].attention.self.query).__name__ == "QKVSlice"
    assert report["pattern_args"] == {"bank": 32, "keep": 8, "sparsity": 0.75}
    assert report["dtype"] == "bfloat16"
    _check_report(report, n_layers=12)
    assert "steps" not in report["recovery"]
    assert "Recovery: none" in stdout


@pytest.mark.parametrize("argv, message", [
    (["--pattern", "diagonal"], "invalid choice: 'diagonal'"),
    (["--sparsity", "1.0"], "sparsity must be in [0, 1), got 1.0"),
    (["--sparsity", "-0.1"], "sparsity must be in [0, 1), got -0.1"),
    (["--sparsity", "half"], "expected a number in [0, 1)"),
    (["--block", "0"], "expected a positive integer"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sparsify", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_model_and_pattern_parameters(tiny_model, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "missing")], "no such directory"),
        (["--model", str(tmp_path)], "no config.json"),
        (["--model", tiny_model, "--pattern", "balanced", "--bank", "48"], "--bank 48 must divide"),
        (["--model", tiny_model, "--pattern", "balanced", "--keep", "40"], "--keep must be in [1, --bank=32], got 40"),
        (["--model", tiny_model, "--pattern", "block", "--block", "100"], "--block 100 is larger"),
        (["--model", tiny_model, "--pattern", "unstructured", "--keep", "4"],
         "--keep 4 is for --pattern balanced; unstructured takes --sparsity only"),
    ]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cases.append((["--model", str(broken)], "cannot load a model and tokenizer"))
    for argv, message in cases:
        rc, _, err = _run(capsys, "sparsify", *argv, "--out", str(tmp_path / "o"), "--no-progress")
        assert rc == 2, (argv, err)
        assert message in err and err.count("\n") == 1, (argv, err)


@pytest.mark.slow  # a fresh interpreter loading transformers
def test_error_exit_code_from_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "sparse", "sparsify", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("sparsekern sparsify: error: --model") and "Traceback" not in proc.stderr


def test_help_explains_every_option(capsys):
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0]
    for command in ("sparsify", "demo"):
        p = sub.choices[command]
        for action in p._actions:
            assert action.help, f"{command} {action.option_strings} has no help"
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        for action in p._actions:
            for opt in action.option_strings:
                assert opt in text


def test_info(capsys):
    rc, out, _ = _run(capsys, "info")
    assert rc == 0
    data = cli.info()
    assert f"cpu code path: {data['isa']['active']}" in out
    assert data["isa"]["active"] == sparse._ext._C.get_isa()
    assert data["isa"]["int8"] == sparse._ext._C.int8_kernel()
    q = data["isa"]["int8_act_qmax"]
    amx = ", AMX tiles for blocks of 16-64 rows and columns, 16+ tokens" if data["isa"]["int8_amx"] else ""
    assert data["isa"]["int8_amx"] == (sparse._ext._C.amx_enabled() and data["isa"]["int8"] == "avx512vnni")
    assert f"int8 kernel: {data['isa']['int8']}{amx} (activations quantized to [-{q}, {q}])" in out
    for name in sparse.ops.BACKENDS:
        assert f"backend {name}:" in out
    assert f"torch {torch.__version__}" in out


def test_bench_forwards_its_arguments(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("sparse.benchmarks")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sparse.benchmarks", fake)
    rc, _, _ = _run(capsys, "bench", "--preset", "tiny", "--help")
    assert rc == 0 and seen == [["--preset", "tiny", "--help"]]


def test_bench_missing_harness_is_a_clean_error(monkeypatch, capsys):
    for name in ("sparse.benchmarks", "benchmarks"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    rc, _, err = _run(capsys, "bench")
    assert rc == 2 and "the benchmark harness is not available" in err and err.count("\n") == 1


# ---- the pieces ------------------------------------------------------------------------------------------------
def test_corpus_split_is_deterministic_and_disjoint():
    a, b = corpus.load(n_heldout=100), corpus.load(n_heldout=100)
    assert a == b
    assert len(a.heldout) == 100 and len(a.train) > 1000
    assert not set(a.heldout) & set(a.train)
    assert all(40 <= len(s) <= 200 for s in a.train + a.heldout)
    # Holding out more keeps the smaller held-out set inside the larger one (the order is by hash).
    assert set(a.heldout) <= set(corpus.load(n_heldout=200).heldout)
    with pytest.raises(ValueError, match="n_heldout"):
        corpus.load(n_heldout=1)


def test_mean_pool_and_agreement():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(evaluate.mean_pool(h, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    torch.manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    assert evaluate.agreement(e, e) == pytest.approx({"cosine": 1.0, "top1_agreement": 1.0})
    assert evaluate.agreement(e, -e)["cosine"] == pytest.approx(-1.0)
    # Sentences 0 and 1 are each other's nearest neighbours in ref; in cand sentence 0 moves next to 2.
    ref = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, -0.2]]), dim=1)
    cand = ref.clone()
    cand[0] = torch.nn.functional.normalize(torch.tensor([0.1, 1.0]), dim=0)
    # Nearest neighbours worked out by hand: ref [1, 0, 1, 2], cand [2, 0, 0, 2]; sentences 1 and 3 agree.
    assert evaluate.agreement(ref, cand)["top1_agreement"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="need two"):
        evaluate.agreement(ref, cand[:3])


@pytest.mark.parametrize("pattern", ["balanced", "block", "unstructured"])
def test_sparsegpt_layer_beats_magnitude_on_its_inputs(pattern):
    torch.manual_seed(0)
    X = torch.randn(2000, 16) @ torch.randn(16, 64) + 0.1 * torch.randn(2000, 64)  # correlated features
    W = torch.randn(48, 64)
    W_new, mask = distill._obs_prune(W, X.double().t() @ X.double(), pattern, sparsity=0.5, block=16, bank=16, keep=8)
    if pattern == "balanced":
        assert bool((mask.reshape(48, 4, 16).sum(-1) == 8).all())
        magnitude = sparse.prune.balanced_mask(W, 16, 8)
    elif pattern == "unstructured":
        assert int(mask.sum()) == 48 * 64 // 2  # half of the one group of 128 (here 64) columns
        assert (mask.sum(1) != 32).any()  # not a per-row (balanced) choice
        magnitude = sparse.prune.magnitude_mask(W, 0.5)
    else:
        tiles = mask.reshape(3, 16, 4, 16).permute(0, 2, 1, 3)
        assert bool((tiles.all(dim=(2, 3)) | ~tiles.any(dim=(2, 3))).all())  # whole tiles
        assert int(tiles.all(dim=(2, 3)).sum()) == 6
        magnitude = sparse.prune.block_mask(W, 16, 0.5)
    assert not W_new[~mask].any()
    err = (X.double() @ (W_new - W.double()).t()).norm()
    err_magnitude = (X @ (W * magnitude - W).t()).norm()
    assert err < 0.7 * err_magnitude


def test_magnitude_masks_unstructured(tiny_model):
    layers = distill.prunable_linears(transformers.AutoModel.from_pretrained(tiny_model))
    masks = distill.compute_masks(layers, "unstructured", sparsity=0.9)
    assert sorted(masks) == sorted(layers)
    for name, m in layers.items():
        a, keep = m.weight.detach().abs(), masks[name]
        assert int(keep.sum()) == a.numel() - int(0.9 * a.numel()) and a[keep].min() >= a[~keep].max(), name
    with pytest.raises(ValueError, match="pattern must be 'block', 'balanced' or 'unstructured', got 'csr'"):
        distill.compute_masks(layers, "csr", sparsity=0.9)


def test_reconstruct_prunes_every_block_and_stays_closer_than_magnitude(tiny_model):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    dense = transformers.AutoModel.from_pretrained(tiny_model).eval()
    text = corpus.load(n_heldout=64)
    enc = tok(text.heldout, padding=True, truncation=True, max_length=64, return_tensors="pt")
    pruned = {}
    for method in ("sparsegpt", "magnitude"):
        model = transformers.AutoModel.from_pretrained(tiny_model).eval()
        layers = distill.prunable_linears(model)
        if method == "sparsegpt":
            masks = distill.reconstruct(model, tok, text.train[:128], layers, "balanced", sparsity=0.75, bank=32,
                                        progress=False)
        else:
            masks = distill.compute_masks(layers, "balanced", sparsity=0.75, bank=32)
            distill.apply_masks(layers, masks)
        assert sorted(masks) == sorted(layers)
        for name, m in layers.items():
            assert bool((masks[name].reshape(m.out_features, -1, 32).sum(-1) == 8).all())
            assert not m.weight[~masks[name]].any()
        pruned[method] = model
    with torch.no_grad():
        t = dense(**enc, output_hidden_states=True).hidden_states
        loss = {k: distill._hidden_loss(m(**enc, output_hidden_states=True).hidden_states[1:], t[1:],
                                        enc["attention_mask"]).item() for k, m in pruned.items()}
    assert loss["sparsegpt"] < loss["magnitude"]


@pytest.mark.slow  # 3 s of distillation by design
def test_distill_keeps_masks_and_lowers_the_loss(tiny_model):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    teacher = transformers.AutoModel.from_pretrained(tiny_model).eval()
    student = transformers.AutoModel.from_pretrained(tiny_model).eval()
    layers = distill.prunable_linears(student)
    assert len(layers) == 12 and all(n.startswith("encoder.") for n in layers)
    masks = distill.compute_masks(layers, "balanced", sparsity=0.5, bank=32)
    distill.apply_masks(layers, masks)
    text = corpus.load(n_heldout=32)
    enc = tok(text.heldout, padding=True, truncation=True, max_length=64, return_tensors="pt")

    def loss() -> float:
        with torch.no_grad():
            s = student(**enc, output_hidden_states=True).hidden_states
            t = teacher(**enc, output_hidden_states=True).hidden_states
            return distill._hidden_loss(s[1:], t[1:], enc["attention_mask"]).item()

    before = loss()
    stats = distill.distill(student, teacher, tok, text.train, masks, seconds=3, lr=1e-3, batch_size=16,
                            progress=False)
    assert stats["steps"] >= 5
    assert loss() < before
    for name, m in layers.items():
        assert not m.weight[~masks[name]].any()
    with pytest.raises(ValueError, match="seconds"):
        distill.distill(student, teacher, tok, text.train, masks, seconds=0)


def test_distill_a_layer_dropped_student_against_the_layers_it_stands_for(tiny_model):
    from sparse.prune import drop_layers, teacher_hidden_states

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    teacher = transformers.AutoModel.from_pretrained(tiny_model).eval()
    student = transformers.AutoModel.from_pretrained(tiny_model).eval()
    kept = drop_layers(student, 1)["encoder.layer"]
    index = teacher_hidden_states(kept, 2)
    assert kept == [0] and index == [0, 2]  # the one kept layer's output is to match the 2-layer model's output
    text = corpus.load(n_heldout=32)
    enc = tok(text.heldout, padding=True, truncation=True, max_length=64, return_tensors="pt")

    def loss() -> float:
        with torch.no_grad():
            s = student(**enc, output_hidden_states=True).hidden_states
            t = teacher(**enc, output_hidden_states=True).hidden_states
            return distill._hidden_loss(s[1:], [t[i] for i in index[1:]], enc["attention_mask"]).item()

    with pytest.raises(ValueError, match="the student has 2 hidden states and the teacher 3: give teacher_hidden"):
        distill.distill(student, teacher, tok, text.train, {}, seconds=60, max_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"teacher_hidden \[0, 1, 2\] must name one of the teacher's 3 hidden "
                                         r"states for each of the student's 2"):
        distill.distill(student, teacher, tok, text.train, {}, seconds=60, max_steps=1, teacher_hidden=[0, 1, 2],
                        progress=False)
    with pytest.raises(ValueError, match=r"teacher_hidden must start at 0 \(the embeddings\) and increase, got "
                                         r"\[2, 1\]"):
        distill.distill(student, teacher, tok, text.train, {}, seconds=60, teacher_hidden=[2, 1], progress=False)
    before = loss()
    stats = distill.distill(student, teacher, tok, text.train, {}, seconds=60, max_steps=8, lr=1e-3, batch_size=16,
                            teacher_hidden=index, progress=False)
    assert stats["steps"] == 8
    assert loss() < before


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_prepacked_linear_matches_the_reference(activation):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    x = torch.randn(3, 7, 96)
    ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    dense = lin(x)
    if activation == "gelu":
        ref, dense = torch.nn.functional.gelu(ref), torch.nn.functional.gelu(dense)
    got = evaluate.PrepackedLinear(lin, activation)(x)
    assert got.shape == (3, 7, 80)
    assert_close_to_ref(got, ref, dense, "PrepackedLinear", floor=1e-6, scale=1.0)  # an absolute floor of 1e-6


def test_prepack_linears_fuses_bert_gelu(tiny_model):
    model = transformers.AutoModel.from_pretrained(tiny_model).eval()
    ids = torch.randint(5, 60, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        n = evaluate.prepack_linears(model)
        got = model(input_ids=ids).last_hidden_state
    assert n == 2 * 6 + 1
    assert all(m.activation == "gelu" for name, m in model.named_modules() if name.endswith("intermediate.dense"))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
