"""The pattern atlas (benchmarks/atlas.py): the Pareto front and the demo rule on hand-made points, the checks of
its arguments, and its smoke mode end to end on a tiny random BERT (the CSV schema, the rows of every point, the
summary, the plot). No timing or accuracy is asserted: the numbers of a smoke run mean nothing."""

from __future__ import annotations

import os
import re

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import atlas  # noqa: E402
from benchmarks.harness import COLUMNS, read_csv  # noqa: E402
from tests.helpers import tiny_bert_dir  # noqa: E402

pytestmark = pytest.mark.skipif(not __import__("sparse")._ext.available(), reason="sparse._C not built")


def _pt(name: str, speedup: float, cosine: float) -> dict:
    return {"pattern": name, "label": name, "nominal": 0.5, "speedup": speedup, "cosine": cosine}


def test_pareto_front_of_hand_made_points():
    a, b, b2 = _pt("a", 1.5, 0.90), _pt("b", 2.0, 0.80), _pt("b2", 2.0, 0.80)  # b2 equals b: both stay
    c = _pt("c", 1.2, 0.85)  # a is faster and more accurate
    d = _pt("d", 0.8, 0.95)  # slower than dense, more accurate than every pruned point
    e = _pt("e", 3.0, 0.50)
    g = _pt("g", 2.0, 0.70)  # as fast as b, less accurate
    h = _pt("h", 1.5, 0.60)  # as fast as a, less accurate
    pts = [c, e, a, g, b, d, h, b2]
    assert [q["pattern"] for q in atlas.pareto_front(pts)] == ["d", "a", "b", "b2", "e"]
    # With the dense model (1x, cosine 1) in the race, a pruned point slower than dense is never worth having.
    front = atlas.pareto_front(pts + [atlas.DENSE_POINT])
    assert [q["pattern"] for q in front] == ["dense", "a", "b", "b2", "e"]
    assert atlas.pareto_front([]) == []
    assert atlas.dominates(a, c) and not atlas.dominates(c, a)
    assert not atlas.dominates(b, b2) and not atlas.dominates(a, e) and not atlas.dominates(e, a)


def test_demo_rule_is_the_most_accurate_point_with_a_real_speedup():
    pts = [_pt("balanced32", 1.03, 0.96), _pt("vector8x1", 1.37, 0.85), _pt("balanced32", 1.53, 0.82),
           _pt("unstructured", 1.29, 0.79), _pt("block32", 2.2, 0.53), _pt("layers", 5.7, 0.30),
           _pt("block16", 1.53, 0.82)]
    assert atlas.MIN_SPEEDUP == 1.25
    assert _key(atlas.pick(pts)) == ("vector8x1", 1.37)  # 1.03x is no gain: balanced 50% is left out
    assert _key(atlas.pick(pts, patterns=atlas.DEMO_PATTERNS)) == ("balanced32", 1.53)  # no vectors in the demo
    assert _key(atlas.pick(pts, 2.0)) == ("block32", 2.2)
    assert atlas.pick(pts, 6.0) is None
    # a tie in cosine goes to the faster point, and the pick is always on the front
    tie = [_pt("a", 1.5, 0.8), _pt("b", 1.6, 0.8), _pt("c", 1.3, 0.7)]
    assert _key(atlas.pick(tie)) == ("b", 1.6)
    for some in (pts, tie):
        assert atlas.pick(some) in atlas.pareto_front(list(some) + [atlas.DENSE_POINT])


def _key(q: dict) -> tuple:
    return q["pattern"], q["speedup"]


def test_timed_layers_are_the_middle_transformer_layers():
    names = [f"encoder.layer.{i}.{kind}" for i in range(6) for kind in ("attention.self.query", "output.dense")]
    assert atlas.timed_layers(names) == ["encoder.layer.3.attention.self.query", "encoder.layer.3.output.dense"]
    assert atlas.timed_layers(names[:4]) == ["encoder.layer.1.attention.self.query", "encoder.layer.1.output.dense"]
    assert atlas.timed_layers(["fc1", "fc2"]) == ["fc2"]  # no numbered layers: each its own group
    assert atlas.timed_layers([]) == []


def test_check_plan_names_what_it_refuses():
    atlas.check_plan(list(atlas.PATTERNS), [0.5, 0.75, 0.9], n_layers=6)
    with pytest.raises(ValueError, match=r"unknown pattern 'block8'.*'unstructured'"):
        atlas.check_plan(["block32", "block8"], [0.5])
    with pytest.raises(ValueError, match=r"sparsity 1.5: expected a number in \(0, 1\)"):
        atlas.check_plan(["block32"], [0.5, 1.5])
    with pytest.raises(ValueError, match=r"'balanced32' at sparsity 0.99 keeps 0 of every 32"):
        atlas.check_plan(["balanced32"], [0.99])
    with pytest.raises(ValueError, match=r"'layers' at sparsity 0.05 drops 0 of the encoder's 6 layers"):
        atlas.check_plan(["layers"], [0.05], n_layers=6)
    with pytest.raises(ValueError, match=r"'layers' at sparsity 0.95 drops 6 of the encoder's 6 layers"):
        atlas.check_plan(["layers"], [0.95], n_layers=6)
    with pytest.raises(ValueError, match="no pattern given"):
        atlas.check_plan([], [0.5])


def test_total_minutes_sets_one_recovery_budget_for_every_point():
    per = atlas.recovery_for(30, 21)
    assert per == pytest.approx((30 * 60 - atlas.SETUP_S) / 21 - atlas.POINT_S)
    assert atlas.SETUP_S + 21 * (atlas.POINT_S + per) == pytest.approx(30 * 60)
    with pytest.raises(ValueError, match=r"total_minutes=5 is too short for 21 points"):
        atlas.recovery_for(5, 21)
    with pytest.raises(ValueError, match=r"total_minutes must be > 0, got -1"):
        atlas.recovery_for(-1, 21)


@pytest.mark.parametrize("argv, message", [
    (["--patterns", "block32,blocks64"], "unknown pattern 'blocks64'"),
    (["--sparsities", "0.5,abc"], "--sparsities '0.5,abc': 'abc' is not a number"),
    (["--sparsities", "0.5,1"], r"sparsity 1.0: expected a number in \(0, 1\)"),
    (["--recover-seconds", "0"], "--recover-seconds must be > 0, got 0"),
    (["--total-minutes", "2"], "total_minutes=2 is too short for 21 points"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--report", "no-such-atlas.csv"], "--report 'no-such-atlas.csv': no such file"),
])
def test_bad_arguments_exit_2_naming_the_value(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        atlas.main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``python -m benchmarks.atlas --smoke`` on a random 2-layer BERT, one thread: (rows, out dir, exit code)."""
    model = tiny_bert_dir(str(tmp_path_factory.mktemp("tiny-bert")))
    out = str(tmp_path_factory.mktemp("atlas"))
    before = torch.get_num_threads()
    try:
        rc = atlas.main(["--smoke", "--model", model, "--out", out, "--no-progress", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    return read_csv(os.path.join(out, "atlas.csv")), out, rc


def test_smoke_writes_every_point_in_the_harness_schema(smoke):
    rows, out, rc = smoke
    assert rc == 0  # no point failed
    with open(os.path.join(out, "atlas.csv")) as f:
        assert f.readline().strip().split(",") == COLUMNS
    assert {r["bench"] for r in rows} == {"atlas"}
    for key, pattern in atlas.PATTERNS.items():
        point = [r for r in rows if r["case"].startswith(f"{key}|0.5|")]
        e2e = [r for r in point if r["op"] == "bert_forward"]
        assert len(e2e) == 4, key  # dense eager and pre-packed, the pruned model as built and pre-packed
        dense = [r for r in e2e if r["format"] == "dense"]
        assert {r["backend"] for r in dense} == {"eager", "onednn_prepacked"}
        best = min(dense, key=lambda r: r["median_s"])
        for r in e2e:  # one baseline per case: the faster dense model of the same measurement
            assert r["baseline"] == f"best_dense({best['backend']})"
            assert r["baseline_s"] == best["median_s"] and r["ratio"] == pytest.approx(best["median_s"] / r["median_s"])
            if r["format"] == "dense":
                assert r["cosine"] == "" and r["top1_agreement"] == ""
            else:
                assert -1.0 <= r["cosine"] <= 1.0 and 0.0 <= r["top1_agreement"] <= 1.0
        layer = [r for r in point if r["op"] == "linear"]
        if pattern.kind == "layers":
            assert layer == []
            assert {r["format"] for r in e2e} - {"dense"} == {"layer_drop"}
            assert all(r["density"] == 0.5 for r in e2e if r["format"] != "dense")  # 1 of 2 layers kept
        else:
            # F.linear, oneDNN and the sparse module for each Linear of the middle (second) layer
            assert len(layer) == 3 * 6 and all(".layer.1." in r["case"] for r in layer)
            for r in layer:
                case = [x for x in layer if x["case"] == r["case"]]
                assert r["baseline_s"] == min(x["median_s"] for x in case if x["format"] == "dense")
            sparse_rows = [r for r in layer if r["format"] != "dense"]
            assert all(0.0 < r["density"] < 1.0 for r in sparse_rows)
            if pattern.kind == "balanced":
                assert {r["block"] for r in sparse_rows} == {"bank32/keep16"}
            elif pattern.kind == "block":
                assert {r["block"] for r in sparse_rows} == {f"{pattern.block[0]}x{pattern.block[1]}"}


def test_smoke_summary_plot_and_report_again(smoke, tmp_path):
    rows, out, _ = smoke
    pts = atlas.points(rows)
    assert [q["pattern"] for q in pts] == list(atlas.PATTERNS)
    for q in pts:
        assert q["steps"] == 2 and q["one_shot"] is not None
        assert (q["layer_speedup"] is None) == (q["pattern"] == "layers")
    md = open(os.path.join(out, "atlas.md")).read()
    assert "at most 2 recovery steps per point" in md
    front = atlas.pareto_front(pts + [atlas.DENSE_POINT])
    assert md.count("**yes**") == len([q for q in front if q["pattern"] != "dense"])
    assert os.path.getsize(os.path.join(out, "atlas.png")) > 10_000
    assert atlas.main(["--report", os.path.join(out, "atlas.csv"), "--out", str(tmp_path)]) == 0
    again = open(tmp_path / "atlas.md").read()
    assert "at most 2 recovery steps per point" in again
    assert again.split("\n")[4:] == md.split("\n")[4:]  # the same table and front (the header has the run time)
