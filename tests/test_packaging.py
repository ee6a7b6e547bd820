"""The Triton kernels are importable as sparse.kernels, and no top-level `kernels` module is shipped."""

import importlib.util
import os

import sparse


def test_kernels_subpackage_is_ours():
    import sparse.kernels

    assert sparse.kernels.__name__ == "sparse.kernels"
    here = os.path.dirname(os.path.abspath(sparse.__file__))
    origin = os.path.abspath(sparse.kernels.__file__)
    # installed: sparse/kernels/; source checkout: kernels/ beside the package
    assert origin.startswith(os.path.join(here, "kernels")) or origin == os.path.join(os.path.dirname(here), "kernels", "__init__.py")


def test_no_top_level_kernels_module_from_this_project():
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # another distribution's `kernels` may be installed; it must not be ours
        assert not os.path.exists(os.path.join(os.path.dirname(spec.origin or ""), "bsr.py"))
