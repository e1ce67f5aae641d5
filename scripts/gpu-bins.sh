# Sourced (from the repo root) by scripts/gpu-all.sh and scripts/gpu-check.sh:
# where the binaries for the GPU checks are. Set and exported:
#   CUDALLOC_BIN       the cudalloc CLI
#   CUDALLOC_GPU_TEST  the GPU test binary (tests/gpu/)
#   CUDALLOC_LIBRARY   libcudalloc.so (the Python package and torch load it)
# A value already in the environment wins. Otherwise they are the bundle's,
# target/gpu-bundle/ (scripts/gpu-all.sh --prep makes it), when that exists;
# else the release build in ${CARGO_TARGET_DIR:-target}/release, with the
# newest target/release/deps/gpu-* as the test binary (cargo names it
# gpu-HASH). Nothing is copied: the unstripped binaries on the build machine
# stay as they are.
# shellcheck shell=bash
gpu_bundle=target/gpu-bundle
if [ -d "$gpu_bundle" ]; then
    : "${CUDALLOC_BIN:=$PWD/$gpu_bundle/cudalloc}"
    : "${CUDALLOC_GPU_TEST:=$PWD/$gpu_bundle/gpu-test}"
    : "${CUDALLOC_LIBRARY:=$PWD/$gpu_bundle/libcudalloc.so}"
else
    gpu_release=${CARGO_TARGET_DIR:-target}/release
    case $gpu_release in /*) ;; *) gpu_release=$PWD/$gpu_release ;; esac
    : "${CUDALLOC_BIN:=$gpu_release/cudalloc}"
    : "${CUDALLOC_LIBRARY:=$gpu_release/libcudalloc.so}"
    if [ -z "${CUDALLOC_GPU_TEST:-}" ]; then
        for gpu_f in "$gpu_release"/deps/gpu-*; do
            case $gpu_f in *.d) continue ;; esac
            [ -x "$gpu_f" ] || continue
            if [ -z "${CUDALLOC_GPU_TEST:-}" ] || [ "$gpu_f" -nt "$CUDALLOC_GPU_TEST" ]; then
                CUDALLOC_GPU_TEST=$gpu_f
            fi
        done
        : "${CUDALLOC_GPU_TEST:=$gpu_release/deps/gpu-HASH}"
    fi
fi
export CUDALLOC_BIN CUDALLOC_GPU_TEST CUDALLOC_LIBRARY
