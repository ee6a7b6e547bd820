"""SPARSEKERN_ISA makes the extension see a CPU without the features above the cap: the features are reported
absent, the best path is capped, and asking for a higher path is refused with the error that an older CPU gives.
Each case runs in a fresh process, since the variable is read once, when the extension loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparse._ext import available
from tests import _reliab as R

pytestmark = pytest.mark.skipif(not available(), reason="sparse._C not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["portable", "avx2", "avx512"]

PROBE = r"""
import json, sparse._ext as e
c = e.require()
out = {"best": c.best_isa(), "active": c.get_isa(), "features": c.cpu_features(), "env": list(c.isa_env())}
refused = {}
for level in ("avx512", "avx2", "portable"):
    try:
        c.set_isa(level)
        refused[level] = None
        assert c.get_isa() == level, (level, c.get_isa())
    except ValueError as exc:
        refused[level] = str(exc)
    c.set_isa("auto")
out["refused"] = refused
int8 = {}  # per cap: [int8 kernel, activation qmax], or the refusal
for level in ("avx512", "avxvnni", "avx2", "portable"):
    try:
        c.set_isa(level)
        int8[level] = [c.int8_kernel(), c.int8_act_qmax()]
    except ValueError as exc:
        int8[level] = str(exc)
    c.set_isa("auto")
out["int8"] = int8
print(json.dumps(out))
"""


def _probe(cap):
    env = {k: v for k, v in os.environ.items() if k != "SPARSEKERN_ISA"}
    if cap is not None:
        env["SPARSEKERN_ISA"] = cap
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return r


def _real_best() -> str:
    r = _probe(None)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["best"]


@pytest.mark.slow  # two fresh interpreters each
@pytest.mark.parametrize("cap", ["avx2", "portable"])
def test_cap_behaves_as_an_older_cpu(cap):
    real = _real_best()
    want = ORDER[min(ORDER.index(cap), ORDER.index(real))]
    r = _probe(cap)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["best"] == want and got["active"] == want, got
    assert got["env"] == [cap, ""], got
    feats = got["features"]
    assert not any(feats[k] for k in ("avx512f", "avx512bw", "avx512vl", "avx512bf16")), feats
    if cap == "portable":
        assert not feats["avx2"] and not feats["fma"], feats
    for level in ORDER:
        msg = got["refused"][level]
        if ORDER.index(level) <= ORDER.index(want):
            assert msg is None, (level, msg)
        else:
            # The refusal of a CPU that lacks the level, with the cap named after it.
            assert msg.startswith(f"isa '{level}' is not supported by this CPU (best: {want}"), msg
            if ORDER.index(level) <= ORDER.index(real):
                assert f"capped by SPARSEKERN_ISA={cap}" in msg, msg


@pytest.mark.slow  # three fresh interpreters
def test_avxvnni_cap_keeps_avx_vnni_and_avx2_hides_it():
    """avxvnni runs an AVX-512 machine as an AVX2 + AVX-VNNI one (an Alder Lake): the int8 kernel is ymm vpdpbusd
    with 8-bit activations. avx2 runs it as an AVX2-only one (a Zen 3): AVX-VNNI is hidden, the int8 kernel is
    vpmaddubsw with 7-bit activations, and asking for avxvnni is refused with the AVX-VNNI named."""
    real = json.loads(_probe(None).stdout)
    if real["best"] == "portable":
        pytest.skip("no AVX2 on this CPU")
    has = real["features"]["avxvnni"]
    if has:
        assert real["int8"]["avxvnni"] == ["avxvnni", 127], real["int8"]
    else:
        assert real["int8"]["avxvnni"].startswith("isa 'avxvnni' is not supported by this CPU (no AVX-VNNI"), real
    r = _probe("avxvnni")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["best"] == "avx2" and got["env"] == ["avxvnni", ""], got
    assert got["features"]["avxvnni"] == has and not got["features"]["avx512f"], got["features"]
    assert not got["features"]["avx512vnni"], got["features"]
    assert got["int8"]["avx2"] == ["avx2", 63] and got["int8"]["portable"] == ["portable", 127], got["int8"]
    assert got["int8"]["avx512"].startswith("isa 'avx512' is not supported by this CPU (best: avx2"), got["int8"]
    if has:
        assert got["int8"]["avxvnni"] == ["avxvnni", 127], got["int8"]
        if real["best"] == "avx512":
            assert "capped by SPARSEKERN_ISA=avxvnni" in got["int8"]["avx512"], got["int8"]
    r = _probe("avx2")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert not got["features"]["avxvnni"], got["features"]
    assert got["int8"]["avx2"] == ["avx2", 63], got["int8"]
    msg = got["int8"]["avxvnni"]
    assert msg.startswith("isa 'avxvnni' is not supported by this CPU (no AVX-VNNI; best: avx2"), msg
    if has:
        assert msg.endswith("capped by SPARSEKERN_ISA=avx2)"), msg


@pytest.mark.slow  # three fresh interpreters
def test_cap_at_or_above_the_cpu_changes_nothing():
    real = _real_best()
    for cap in ("auto", "avx512"):
        r = _probe(cap)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["best"] == real, (cap, got)
        assert all(got["refused"][lv] is None for lv in ORDER[: ORDER.index(real) + 1]), got


def test_bad_cap_is_a_clear_error():
    r = _probe("avx-512")
    assert r.returncode != 0
    assert "ValueError: SPARSEKERN_ISA='avx-512' is not a code path" in r.stderr, r.stderr


def test_fixture_levels_follow_the_cap(isa):
    """The suite's `isa` fixture enumerates exactly the levels the (capped) CPU allows."""
    assert isa in R.isa_levels()
    assert R.isa_levels() == ORDER[: ORDER.index(R.require().best_isa()) + 1]
