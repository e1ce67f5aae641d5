#!/usr/bin/env bash
# `pip install .` into a fresh venv, then check the installed package:
# the wheel holds libcudalloc.so and the start-up hook, `import cudalloc`
# works without torch or CUDA, the hook is inert when CUDALLOC is unset and
# live when set, and the Python tests pass against the installed copy.
# One release build of the crate (CARGO_TARGET_DIR is honoured; default target/).
# Run from CI by scripts/test.d/python.sh; by hand: bash tests/python/pip_install_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
t0=$(date +%s)

"$PY" -m venv "$tmp/venv"
V="$tmp/venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# Build the wheel once (pip fetches setuptools/wheel into an isolated build env).
"$V" -m pip wheel -q --no-deps -w "$tmp/dist" "$REPO"
whl=$(ls "$tmp"/dist/cudalloc-*.whl)
echo "built $(basename "$whl") ($(du -h "$whl" | cut -f1)) in $(( $(date +%s) - t0 ))s"
case "$(basename "$whl")" in
    *-py3-none-linux_*.whl) ;;
    *) echo "unexpected wheel tag: $whl" >&2; exit 1 ;;
esac
"$V" - "$whl" <<'PYEOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
for need in ("cudalloc/libcudalloc.so", "cudalloc/__init__.py", "cudalloc-autoenable.pth"):
    assert need in names, f"{need} missing from the wheel: {sorted(names)}"
PYEOF
"$V" -m pip install -q "$whl" pytest

# From a directory outside the repo, so only the installed package can be found.
cd "$tmp"
unset CUDALLOC CUDALLOC_CONF CUDALLOC_LIBRARY CUDALLOC_PATCH_TORCH PYTHONPATH || true
"$V" -c '
import os, sys, cudalloc
assert "torch" not in sys.modules
site = os.path.dirname(os.path.dirname(cudalloc.__file__))
assert cudalloc.__file__.startswith(sys.prefix), cudalloc.__file__
assert cudalloc.library_path() == os.path.join(site, "cudalloc", "libcudalloc.so")
assert os.path.isfile(os.path.join(site, "cudalloc-autoenable.pth"))
print("import cudalloc: ok,", cudalloc.library_path())
'
# The hook: inert without CUDALLOC, armed with it.
"$V" -c 'import sys; m = [x for x in sys.modules if x.startswith(("cudalloc", "torch"))]; assert not m, m'
CUDALLOC=1 "$V" -c 'import sys; assert "cudalloc._autoenable" in sys.modules and "torch" not in sys.modules'
# Bundled library on the sim backend, no torch.
CUDALLOC_CONF=backend:sim,sim_memory:1GiB "$V" -c '
import cudalloc
from cudalloc import _lib
p = _lib.lib().cudalloc_malloc(1000, 0, None)
assert p and cudalloc.memory_stats()["allocated_bytes.all.current"] == 1024
print("bundled library on the sim backend: ok")
'
# Interpreter start-up with and without the hook's .pth, CUDALLOC unset.
"$V" - <<'PYEOF'
import os, subprocess, sys, time
import cudalloc
pth = os.path.join(os.path.dirname(os.path.dirname(cudalloc.__file__)), "cudalloc-autoenable.pth")
def startup(n=15):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3
with_hook = startup()
os.rename(pth, pth + ".off")
try:
    without = startup()
finally:
    os.rename(pth + ".off", pth)
print(f"interpreter start-up, CUDALLOC unset: {with_hook:.1f} ms with the hook, {without:.1f} ms without")
PYEOF
# The Python tests, against the installed package and its bundled library.
CUDALLOC_TEST_INSTALLED=1 "$V" -m pytest "$REPO/tests/python" -q -p no:cacheprovider --rootdir "$REPO"
echo "pip install check: ok in $(( $(date +%s) - t0 ))s"
