#!/usr/bin/env bash
# Proves the three ways of using the package: `pip install .`, `pip install -e .`, and tests from a clean
# checkout. Each install goes into a fresh venv that reuses the project venv's packages (torch etc.), and must
# import `sparse.kernels` from the package while installing no top-level `kernels` module.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PY:-$root/.venv/bin/python}
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$root" clone -q "$root" "$work/src"

probe='
import importlib.util, os, sys
os.chdir("/")
import sparse, sparse.kernels, torch
assert importlib.util.find_spec("kernels") is None or "sparse" in (importlib.util.find_spec("kernels").origin or ""), "a top-level kernels module is installed"
w = sparse.BlockSparseWeight.from_dense(torch.randn(64, 64), block=16, sparsity=0.5)
x = torch.randn(3, 64)
assert torch.allclose(sparse.linear(x, w), x @ w.to_dense().t(), atol=1e-5)
print("  sparse from", os.path.dirname(sparse.__file__), "| sparse.kernels from", os.path.dirname(sparse.kernels.__file__))
'
for mode in regular editable; do
  echo "== pip install ($mode)"
  "$py" -m venv "$work/venv-$mode"
  echo "$site" > "$work/venv-$mode/lib/python3.11/site-packages/project-venv.pth"
  # a new venv brings its own, older setuptools, which sits before the .pth entries
  "$work/venv-$mode/bin/python" -m pip install -q "setuptools>=77"
  src="$work/src"
  [ "$mode" = regular ] && flag="" || flag="-e"
  (cd "$src" && MAX_JOBS=2 "$work/venv-$mode/bin/python" -m pip install -q --no-build-isolation --no-deps $flag .)
  "$work/venv-$mode/bin/python" -c "$probe"
  (cd "$src" && git clean -qfdx -e .venv >/dev/null)
done
echo "== tests from the clean checkout (extension built in place)"
# With the editable venv's Python: the project venv's own editable install maps sparse.kernels to the project
# checkout, not to this clone (its finder comes after the clone's sparse/ on sys.path).
edpy="$work/venv-editable/bin/python"
(cd "$work/src" && MAX_JOBS=2 "$edpy" setup.py -q build_ext --inplace >/dev/null 2>&1 && "$edpy" -m pytest -q tests/test_formats.py tests/test_packaging.py)
echo "all three ways work"
