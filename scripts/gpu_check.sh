#!/usr/bin/env bash
# Every GPU check of issue 28 in one run, for a lent GPU machine (docs/gpu.md says what it proves).
#
#   bash scripts/gpu_check.sh            # on the GPU machine, from the repository root
#
# The machine has CUDA PyTorch, transformers and accelerate but no package registry: the packages
# loraplex needs beyond those travel in .gpu/site (pydantic, sqlalchemy, gguf, peft, typer,
# bitsandbytes with its CUDA 13 library only) and SmolLM2's tokenizer in .gpu/tokenizer, both made
# by `bash scripts/gpu_check.sh --prepare` on the development machine (.gpu/ is git-ignored).
# Results go to $OUT (default /tmp/gpu-check): the test log, the benchmark's JSON and its table.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then  # on the development machine (pip reaches PyPI there)
    set -e
    rm -rf .gpu/site && mkdir -p .gpu/site .gpu/wheels
    # the versions the CPU suite runs with; the GPU image's own torch/transformers/accelerate stay
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/wheels pydantic==2.14.4 pydantic-core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5 sqlalchemy==2.1.9 gguf==0.19.0 peft==0.21.2 \
        typer==0.29.2 bitsandbytes==0.50.2
    python3 -m pip install -q --no-deps --no-compile --target .gpu/site --python-version 3.12 \
        --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        .gpu/wheels/*.whl
    rm -rf .gpu/wheels .gpu/site/bin
    # phonenumbers' data is 25 MB unpacked: these two travel as wheels (64 MiB may travel a call)
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels phonenumbers==9.0.43 python-stdnum==2.2
    # bitsandbytes ships a library per CUDA and ROCm version (43 MB): keep the image's CUDA 13 one
    find .gpu/site/bitsandbytes -name '*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
    .venv/bin/python -c "from loraplex.models.load import load_tokenizer, resolve_base
load_tokenizer(resolve_base(None)).save_pretrained('.gpu/tokenizer')"
    du -sh .gpu
    exit 0
fi

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-site .gpu/wheels/*.whl || exit 1
export PYTHONPATH="$PWD/.gpu/site:/tmp/gpu-site:$PWD/src:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
lscpu | grep -E '^(Model name|CPU\(s\))'
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"

# 1. the GPU tests (tests/test_cuda.py): graph replay vs eager, engine on CUDA vs CPU, training bf16 + QLoRA
timeout "${TESTS_S:-170}" python3 -m pytest -q -p no:cacheprovider -p no:randomly -o addopts="" \
    tests/test_cuda.py -k "${TESTS_K:-}" 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}

# 2. the Llama-3-8B shape: decode with and without CUDA graphs (8 adapters vs bare base; the costliest
#    kernels of one batch each way), then training tokens/s and peak memory (bf16, QLoRA) against plan
timeout "${BENCH_S:-300}" python3 bench/gpu_scale.py --tokenizer .gpu/tokenizer --tokens 64 --reps 3 \
    --parts "${BENCH_PARTS:-decode,bf16,qlora}" --steps "${STEPS:-8}" --profile \
    --json "$OUT/gpu_scale.json" 2>&1 | grep -v "^\[.*WARNING" | tee "$OUT/gpu_scale.log"
bench=${PIPESTATUS[0]}

# 3. a Qwen2.5-1.5B shape, decode only: a small model, where launches rather than weights set the step time
[ "${SMALL_S:-80}" = 0 ] || timeout "${SMALL_S:-80}" python3 bench/gpu_scale.py --shape qwen2.5-1.5b --parts decode --tokenizer .gpu/tokenizer \
    --tokens 64 --reps 3 --json "$OUT/gpu_scale_qwen.json" 2>&1 | grep -v "^\[.*WARNING" | tee "$OUT/qwen.log"
small=${PIPESTATUS[0]}

echo "exit codes: tests $tests, llama-3-8b bench $bench, qwen2.5-1.5b bench $small"
tail -n 3 "$OUT/tests.log"
