#!/usr/bin/env bash
# One device call: install the vLLM 0.26 bundle carried to /tmp/stage, install this tree,
# run the GPU tests and the benchmarks named in $@, results under $OUT.
#   bash benchmarks/gpu_run.sh tests kernels profile smollm2 llama8b sweep report
set -uo pipefail
bash /tmp/stage/install.sh /tmp/stage /tmp/site >/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_V2_MODEL_RUNNER=0 VLLM_USE_FLASHINFER_SAMPLER=0 \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for step in "$@"; do
  case $step in
    tests)
      timeout 420 python3 -m pytest -q -x -rs tests/kernels/test_cuda_kernels.py \
        tests/test_gpu_engine.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
    kernels)
      timeout 300 python3 -m pytest -q -x -rs tests/kernels/test_cuda_kernels.py \
        > "$OUT/gpu-kernel-tests.log" 2>&1 || { tail -40 "$OUT/gpu-kernel-tests.log"; exit 1; }
      tail -3 "$OUT/gpu-kernel-tests.log" ;;
    profile)
      timeout 540 python3 benchmarks/ttft.py --model llama8b --profile-len 32768 \
        --out "$OUT/x.json" 2>&1 | grep -v -E "^\(EngineCore|INFO|WARNING|it/s" | tail -5; ls "$OUT" ;;
    sweep)
      # SmolLM2 engines started in a child process with vLLM's engine-core process on hung
      # at start-up on the H100 (twice, > 9 min); in-process engines start in ~40 s
      export VLLM_ENABLE_V1_MULTIPROCESSING=0
      # resumable: finished engines are cached in /tmp/rkq while the machine stays warm
      timeout 560 python3 benchmarks/quality.py sweep --scores head_class/smollm2-135m-instruct.json \
        --workdir /tmp/rkq --emit "$OUT/default" --out "$OUT/quality-sweep-smollm2.json" \
        2>&1 | grep --line-buffered -E "^\[(quality|sweep)\]|Error|error" | tail -40
      mkdir -p /tmp/rkq/default "$OUT/logs" && cp -r "$OUT/default/." /tmp/rkq/default/ 2>/dev/null
      cp /tmp/rkq/log-* "$OUT/logs/" 2>/dev/null ;;
    report)
      export VLLM_ENABLE_V1_MULTIPROCESSING=0
      ffn=(); [ -f /tmp/rkq/default/sparse_ffn.json ] && ffn=(--sparse-ffn /tmp/rkq/default/sparse_ffn.json)
      timeout 560 python3 benchmarks/quality.py report --workdir /tmp/rkq \
        --head-config "${QUALITY_HEAD:-/tmp/rkq/default/head_config.json}" "${ffn[@]}" \
        --out "$OUT/quality-smollm2.json" 2>&1 | grep --line-buffered -E "^\[quality\]|Error|error" | tail -40 ;;
    smollm2|llama8b)
      timeout 540 python3 benchmarks/ttft.py --model "$step" --out "$OUT/ttft-$step.json" \
        ${TTFT_ARGS:-} 2>&1 | tee "$OUT/ttft-$step.raw.log" | grep --line-buffered -v -E "^\(EngineCore|INFO|WARNING|it/s" | tail -20 ;;
  esac
done
