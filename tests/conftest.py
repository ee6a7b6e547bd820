"""Test-session set-up. Triton kernels run under the interpreter on CPU tensors unless a GPU is present; the
variable must be set before anything imports triton (torch.compile may), hence here."""

import os
import tempfile

# Inductor's on-disk cache is machine-wide (/tmp/torchinductor_<user>) and does not key on everything our ops
# depend on: a compiled graph cached by another checkout or build of this package was seen to give wrong gradients
# here. The suite compiles into a cache of its own for each run.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="sparsekern-inductor-"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

from tests import _reliab as R  # noqa: E402
from tests import helpers as H  # noqa: E402


@pytest.fixture(params=R.isa_levels())
def isa(request: pytest.FixtureRequest):
    """Every CPU code path this machine (or its SPARSEKERN_ISA cap) can run, forced in turn."""
    with R.isa(request.param):
        assert R.require().get_isa() == request.param
        yield request.param


@pytest.fixture(params=H.DTYPES, ids=str)
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """Every dtype the ops take (tests/helpers.py DTYPES). A test over a subset parametrizes ``dtype`` itself
    (e.g. with helpers.VECTOR_DTYPES), which overrides this fixture."""
    return request.param


@pytest.fixture(params=H.ACTS)
def activation(request: pytest.FixtureRequest) -> str:
    """Every fused activation of the package (sparse.ops.ACTIVATIONS)."""
    return request.param


@pytest.fixture
def make_bsr():
    """The random BlockSparseWeight factory, tests/helpers.py make_bsr(out, in, block, sparsity=/density=/mask=,
    dtype=, seed=, ...)."""
    return H.make_bsr


@pytest.fixture
def make_balanced():
    """The random BalancedSparseWeight factory, tests/helpers.py make_balanced(out, in, bank, keep, dtype=,
    seed=, ...)."""
    return H.make_balanced
