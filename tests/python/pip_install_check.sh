#!/usr/bin/env bash
# `pip install .` into a fresh venv, then check the installed package:
# the wheel holds libcudalloc.so, the `cudalloc` command-line tool (both
# without debug information) and the start-up hook, the `cudalloc` command
# is on the venv's PATH and runs, `import cudalloc` works without torch or
# CUDA, the hook is inert when CUDALLOC is unset and live when set, and the
# Python tests pass against the installed copy.
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
for need in ("cudalloc/libcudalloc.so", "cudalloc/bin/cudalloc", "cudalloc/_cli.py",
             "cudalloc/__init__.py", "cudalloc-autoenable.pth"):
    assert need in names, f"{need} missing from the wheel: {sorted(names)}"
z = zipfile.ZipFile(sys.argv[1])
mode = z.getinfo("cudalloc/bin/cudalloc").external_attr >> 16
assert mode & 0o111, f"cudalloc/bin/cudalloc is not executable in the wheel: {oct(mode)}"
ep = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
assert ep and "cudalloc = cudalloc._cli:main" in z.read(ep[0]).decode(), ep
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
# The wheel's binaries carry no debug information.
site=$("$V" -c 'import cudalloc, os; print(os.path.dirname(cudalloc.__file__))')
for f in "$site/libcudalloc.so" "$site/bin/cudalloc"; do
    if command -v readelf >/dev/null; then
        sections=$(readelf -S -W "$f")
        if grep -q '\.debug_info' <<<"$sections"; then
            echo "$f has a .debug_info section: not stripped" >&2
            exit 1
        fi
    elif command -v file >/dev/null && file "$f" | grep -q 'with debug_info'; then
        echo "$f has debug information: not stripped" >&2
        exit 1
    fi
    echo "installed $(basename "$f"): $(du -h "$f" | cut -f1), no debug information"
done
# The `cudalloc` command: on the venv's PATH, running the bundled tool.
PATH="$tmp/venv/bin:$PATH"
[ "$(command -v cudalloc)" = "$tmp/venv/bin/cudalloc" ] || { echo "cudalloc is not on the venv's PATH" >&2; exit 1; }
[ "$(cudalloc --version)" = "cudalloc $("$V" -c 'import cudalloc; print(cudalloc.__version__)')" ] ||
    { echo "cudalloc --version: $(cudalloc --version)" >&2; exit 1; }
help=$(cudalloc --help)
grep -q '^Usage: cudalloc' <<<"$help" || { echo "cudalloc --help: $help" >&2; exit 1; }
out=$(cudalloc replay "$REPO/tests/data/random_seed1.csv")
grep -q 'failures (OOM at this capacity) *0$' <<<"$out" || { echo "cudalloc replay: $out" >&2; exit 1; }
echo "cudalloc command: ok ($(grep -c . <<<"$out") lines from cudalloc replay tests/data/random_seed1.csv)"
version=$("$V" -m cudalloc --version)
grep -qx "library: [0-9.]* at $site/libcudalloc.so" <<<"$version" ||
    { echo "python -m cudalloc --version: $version" >&2; exit 1; }
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
