#!/usr/bin/env bash
# The GPU checks, as one script under 8 minutes on a machine with one NVIDIA GPU and no internet.
#
#   bash benchmarks/gpu_check.sh prepare   # here, in the project's environment, with PyPI: fills .whl/ (git ignores it)
#   bash benchmarks/gpu_check.sh           # there, from the repo root, with .whl/ copied along
#   bash benchmarks/gpu_check.sh kernel    # there: the Triton column loop's checks alone (about 3 minutes)
#   bash benchmarks/gpu_check.sh prepare-table   # here: the real-weights table's payload, in .whl/
#   bash benchmarks/gpu_check.sh table     # there: benchmarks/gpu_table.py on SmolLM2-135M's real weights
#
# `prepare` downloads the wheels the GPU image lacks (transformers >= 5.21, greenlet; the image's torch,
# safetensors, tokenizers, huggingface_hub, pyarrow, numpy and pytest serve as they are; Prefect is not
# needed: nothing here runs a flow) and copies the embedded SmolLM2's tokenizer files into
# .whl/tokenizer (its weights, 94 MiB, are too large to travel). The check then
#   1. runs the tests marked `device` (`pytest -m device`) with SPARSEGPT_TEST_DEVICE=cuda: the solve,
#      the transfers, the one-shot pipeline, block-wise perplexity and task scoring, reconstruction,
#      each against its CPU reference;
#   2. runs benchmarks/gpu_bench.py on the SmolLM2-1.7B shape (first 8 blocks, random init, bf16):
#      the one-shot stages with --device cuda --dtype auto (bf16), seconds per stage and a block, GPU
#      memory peak, and the pruned model's perplexity in the GPU's bf16 and fp32 and the CPU's fp32.
# `kernel` runs instead: the device tests (the Triton kernel's among them, compiled), benchmarks/bench_solver.py --kernels torch,triton on SmolLM2's and Llama-7B's shapes at 50%
# and 2:4 (with the kernel's tile heights), and gpu_bench.py's prune stage with --kernel torch and triton
# (default and --sequential mode).
# `table` runs benchmarks/gpu_table.py (the authors' code next to ours, real weights, WikiText-2, bf16;
# about 4 minutes). Its payload (`prepare-table`: the embedded GGUF in three 32 MiB parts, the first
# in .whl/p with its md5, the others in .whl-more/; the WikiText-2 files in .whl/data; the wheels that
# read a GGUF in .whl/extra) is over the device tool's 64 MiB a call, so it goes over in three calls to
# one warm machine, each within its idle window: carry [".whl"] (command `true`), then
# [".whl-more/smol.part01"] (`true`), then [".whl-more/smol.part02"] with `bash benchmarks/gpu_check.sh
# table`, which checks the md5 of the parts put together.
# Logs and figures go to $OUT (the device tool's folder) or /tmp/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
WHL=.whl

if [ "${1:-}" = prepare ]; then
    mkdir -p "$WHL/tokenizer"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHL" "transformers==5.24.0" "greenlet==3.5.6" || exit 1
    tok=$(python -c "from stages.model.checkpoint import resolve_model; print(resolve_model('smollm2-135m'))") || exit 1
    for f in tokenizer.json tokenizer_config.json special_tokens_map.json; do
        [ -f "$tok/$f" ] && cp "$tok/$f" "$WHL/tokenizer/"
    done
    du -sh "$WHL"
    exit 0
fi

if [ "${1:-}" = prepare-table ]; then
    gguf=$(python -c "from stages.model.embedded import gguf_path; print(gguf_path())") || exit 1
    wikitext=${WIKITEXT:-../shared/data/wikitext2}
    mkdir -p "$WHL/p" "$WHL/data" "$WHL/extra" .whl-more
    rm -f "$WHL"/p/smol.part* .whl-more/smol.part*
    split -b 32m -d "$gguf" .whl-more/smol.part || exit 1
    mv .whl-more/smol.part00 "$WHL/p/"
    md5sum < "$gguf" | cut -d' ' -f1 > "$WHL/p/md5"
    cp "$wikitext/wiki.valid.raw" "$wikitext/wiki.test.raw" "$WHL/data/" || exit 1
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHL/extra" gguf accelerate psutil pyyaml || exit 1
    ls -l "$WHL/p" .whl-more && du -sh "$WHL"
    exit 0
fi

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls "$WHL"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHL"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
if ls "$WHL"/extra/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHL"/extra/*.whl || exit 1
fi
# data/ is the package sparsegpt_pipeline_data once installed (pyproject.toml); here it runs from the tree.
mkdir -p /tmp/site && ln -sfn "$PWD/data" /tmp/site/sparsegpt_pipeline_data
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"

if [ "${1:-}" = table ]; then
    mkdir -p /tmp/smol
    cat "$WHL"/p/smol.part00 .whl-more/smol.part01 .whl-more/smol.part02 > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
    [ "$(md5sum < /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)" = "$(cat "$WHL/p/md5")" ] \
        || { echo "the GGUF's parts do not add up (md5); send all three"; exit 1; }
    python3 -c "from pathlib import Path; from stages.model.embedded import _convert_gguf
_convert_gguf(Path('/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf'), Path('/tmp/smol-st'))" 2>&1 | tail -2
    timeout 420 python3 benchmarks/gpu_table.py --model /tmp/smol-st --wikitext "$WHL/data" --device cuda \
        --dtype bfloat16 --work /tmp/gpu-table --out "$OUT/gpu_table.json" 2>&1 | tail -12 | tee "$OUT/table.log"
    exit "${PIPESTATUS[0]}"
fi

if [ "${1:-}" = kernel ]; then
    python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
    mapfile -t files < <(grep -rl "pytest.mark.device" tests --include="test_*.py")
    SPARSEGPT_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -m device -p no:cacheprovider "${files[@]}" 2>&1 \
        | tail -30 | tee "$OUT/tests.log"
    tests=$?
    for nm in "" 2:4; do
        timeout 100 python3 benchmarks/bench_solver.py --device cuda --solve-only --kernels torch,triton \
            --block-rows ${nm:+--nm $nm} 2>&1 | tee -a "$OUT/solver.log"
    done
    for mode in "" --sequential; do
        for kernel in torch triton; do
            timeout 120 python3 benchmarks/gpu_bench.py --shape smollm2-1.7b --blocks 4 --device cuda $mode \
                --eval-windows 0 --kernel $kernel --tokenizer "$WHL/tokenizer" --work /tmp/gpu-work \
                --out "$OUT/gpu_bench_$kernel$mode.json" 2>&1 | tail -25 | tee -a "$OUT/bench.log"
        done
    done
    echo "tests rc $tests"
    exit "$tests"
fi

# 1. The device tests: the modules that hold one (none imports Prefect, datasets or gguf).
mapfile -t files < <(grep -rl "pytest.mark.device" tests --include="test_*.py")
SPARSEGPT_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -m device -p no:cacheprovider "${files[@]}" 2>&1 \
    | tail -40 | tee "$OUT/tests.log"
tests=$?

# 2. The harness on the GPU.
timeout 240 python3 benchmarks/gpu_bench.py --shape smollm2-1.7b --blocks 8 --device cuda \
    --tokenizer "$WHL/tokenizer" --work /tmp/gpu-work --out "$OUT/gpu_bench.json" 2>&1 | tail -60 | tee "$OUT/bench.log"
bench=$?
echo "tests rc $tests, bench rc $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
