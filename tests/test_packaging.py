"""The Triton kernels are importable as sparse.kernels, and no top-level `kernels` module is shipped."""

import os
import subprocess
import sys


def test_kernels_subpackage_is_ours():
    import sparse.kernels

    assert sparse.kernels.__name__ == "sparse.kernels"
    here = os.path.dirname(os.path.abspath(sparse.__file__))
    origin = os.path.abspath(sparse.kernels.__file__)
    # installed: sparse/kernels/; source checkout: kernels/ beside the package
    assert origin.startswith(os.path.join(here, "kernels")) or origin == os.path.join(
        os.path.dirname(here), "kernels", "__init__.py"
    )


def test_subpackages_come_from_the_install_mapping():
    """kernels/ and benchmarks/ are sparse.kernels and sparse.benchmarks through setuptools' package_dir (the
    wheel copies them, the editable install maps them), not through a module that sparse creates by hand."""
    import sparse.benchmarks
    import sparse.kernels

    for mod, src in ((sparse.kernels, "kernels"), (sparse.benchmarks, "benchmarks")):
        assert mod.__spec__.name == mod.__name__
        assert os.path.basename(os.path.dirname(os.path.abspath(mod.__file__))) == src
    assert not hasattr(sparse, "_map_source_package")


def test_no_top_level_kernels_module_from_this_project(tmp_path):
    """Outside the checkout (which has kernels/ at its root), this install must not provide `kernels`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import importlib.util, sparse.kernels; s = importlib.util.find_spec('kernels'); "
             "print('none' if s is None else s.origin)")
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    origin = out.stdout.strip()
    # another distribution's `kernels` may be installed; it must not be ours
    assert origin == "none" or not os.path.exists(os.path.join(os.path.dirname(origin), "bsr.py")), origin
