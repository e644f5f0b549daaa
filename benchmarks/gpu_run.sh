#!/usr/bin/env bash
# One device call: install the vLLM 0.26 bundle carried to /tmp/stage, install this tree,
# run the GPU tests and the benchmarks named in $@, results under $OUT.
#   bash benchmarks/gpu_run.sh tests kernels profile smollm2 llama8b sweep report
set -uo pipefail
SWEEP_KEYS=dense=7fd0bc93f846e1bd1070,profiled-g0.1-w512=7a0ff450215ad6472106,profiled-g0.2-w512=0a584cc9fb9462977ea1,profiled-g0.35-w512=5b67bab6c8cf98ec6cd5,profiled-g0.1-w1024=40c89d321bbe057ffe3f,profiled-g0.2-w1024=f3782a966c69e4754d1d,profiled-g0.35-w1024=cc2e14f44ac99604a6b7,random-g0.2-w1024=fe4d6d9dfa5b44e70992
# Steps that finish leave /tmp/rkq/done-STEP (while the machine stays warm), so the same
# command line given again continues where the last call stopped. BUDGET_S (default 575)
# bounds the whole call: a step gets at most what is left, and none starts with < 30 s.
# Keep BUDGET_S under the session's device time left as well: a call cut off by the lease
# returns nothing (the results are packed into $OUT at the end).
start=$(date +%s); budget=${BUDGET_S:-575}
left() { echo $(( budget - ($(date +%s) - start) )); }
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
if [ ! -f /tmp/site/.redknot-installed ]; then
  bash /tmp/stage/install.sh /tmp/stage /tmp/site >/dev/null || exit 1
  touch /tmp/site/.redknot-installed
fi
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_V2_MODEL_RUNNER=0 VLLM_USE_FLASHINFER_SAMPLER=0 \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
mkdir -p /tmp/rkq
for step in "$@"; do
  [ -f "/tmp/rkq/done-$step" ] && { echo "[gpu_run] $step: done in an earlier call"; continue; }
  [ "$(left)" -lt 30 ] && { echo "[gpu_run] out of call time before $step"; break; }
  echo "[gpu_run] $(date +%T) $step ($(left) s left)"
  case $step in
    tests)
      timeout 420 python3 -m pytest -q -x -rs tests/kernels/test_cuda_kernels.py \
        tests/test_gpu_engine.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
    ipc)
      timeout 180 python3 -m pytest -q -x -rs tests/test_cuda_ipc.py -k "two_processes or pack" \
        2>&1 | tee "$OUT/ipc-tests.log" | tail -4
      touch /tmp/rkq/done-$step ;;  # the log tells; pd shows a failing handle as recompute
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
      # resumable: finished engines are cached in /tmp/rkq while the machine stays warm;
      # the committed raw runs of the first sweep (commit 5497983) seed the cache, under the
      # keys they were written with (their spec hash covered the profile's date)
      mkdir -p /tmp/rkq && tar xzf benchmarks/results/raw/quality-sweep-smollm2-runs.tar.gz -C /tmp/rkq
      timeout ${SWEEP_TIMEOUT:-560} python3 benchmarks/quality.py sweep --scores head_class/smollm2-135m-instruct.json \
        --keys "$SWEEP_KEYS" \
        --workdir /tmp/rkq --emit "$OUT/default" --out "$OUT/quality-sweep-smollm2.json" \
        2>&1 | grep --line-buffered -E "^\[(quality|sweep)\]|Error|error" | tail -40
      mkdir -p /tmp/rkq/default "$OUT/logs" && cp -r "$OUT/default/." /tmp/rkq/default/ 2>/dev/null
      cp /tmp/rkq/log-* "$OUT/logs/" 2>/dev/null; mkdir -p "$OUT/runs"; cp /tmp/rkq/run-*.json "$OUT/runs/" ;;
    report)
      export VLLM_ENABLE_V1_MULTIPROCESSING=0
      ffn=(); [ -f /tmp/rkq/default/sparse_ffn.json ] && ffn=(--sparse-ffn /tmp/rkq/default/sparse_ffn.json)
      timeout 560 python3 benchmarks/quality.py report --workdir /tmp/rkq \
        --head-config "${QUALITY_HEAD:-/tmp/rkq/default/head_config.json}" "${ffn[@]}" \
        --out "$OUT/quality-smollm2.json" 2>&1 | grep --line-buffered -E "^\[quality\]|Error|error" | tail -40 ;;
    reuse|reuse-*)
      # REUSE_ARGS="--engines quality stock" in one call and "--engines redknot" in the next:
      # finished engines wait in /tmp/rkr while the machine stays warm. reuse-NAME: one of
      # several runs in a call, with REUSE_ARGS_NAME and REUSE_OUT_NAME (then results are
      # kept under /tmp/rkq/reuse-NAME/ and packed with the rest)
      df -h /tmp /dev/shm | tail -2
      if [ "$step" = reuse ]; then rargs=${REUSE_ARGS:-}; rout="$OUT/${REUSE_OUT:-reuse-h200.json}"; rlog="$OUT/reuse.raw.log"
      else v=REUSE_ARGS_${step#reuse-}; o=REUSE_OUT_${step#reuse-}; rargs=${!v:-}
        mkdir -p /tmp/rkq/$step; rout=/tmp/rkq/$step/${!o:-reuse.json}; rlog=/tmp/rkq/$step/reuse.raw.log; fi
      timeout "$(cap ${REUSE_TIMEOUT:-560})" python3 benchmarks/reuse.py --allow-partial --workdir /tmp/rkr --out "$rout" $rargs 2>&1 \
        | tee "$rlog" | grep --line-buffered -E "^\[(reuse|stock|redknot|quality)\]|x dense|Error|error|Traceback" | tail -40
      rrc=${PIPESTATUS[0]}
      # done when it exited cleanly and no quality run was cut (its partial file stays; a
      # quality-only run assembles no --out, its engine's file is in the parts)
      [ "$step" != reuse ] && [ "$rrc" = 0 ] && ! ls /tmp/rkr/*.partial.json >/dev/null 2>&1 \
        && touch /tmp/rkq/done-$step
      # the engines' results (a cut quality run: its partial file), packed: 8 files come back
      (cd /tmp/rkr && tar czf "$OUT/reuse-parts.tar.gz" $(ls *.json *.txt 2>/dev/null)) ;;
    qwen05)
      # convert the Qwen2.5-Coder-0.5B GGUF once (its chunk wheels came with the bundle),
      # then the converted tensors' digests (is the conversion the same on every host?)
      timeout "$(cap 300)" python3 -m redknot_vllm.cli model qwen2.5-coder-0.5b 2>&1 | tail -2
      timeout "$(cap 60)" python3 -c "import json; from redknot_vllm.fingerprint import tensor_digests as t; from redknot_vllm.registry import resolve_model as r; json.dump(t(r('qwen2.5-coder-0.5b')), open('/tmp/rkq/tensor-digests-qwen05.json', 'w'), indent=0)" 2>&1 | tail -2 ;;
    qrestore)
      # the committed raw runs of the earlier Qwen lease (profile, dense and RedKnot runs):
      # a tuning sweep resumes from them; a report's dense engine is run again (same lease)
      tar xzf benchmarks/results/raw/quality-qwen05-runs.tar.gz -C /tmp/rkq --exclude='done-*' ;;
    kscale)
      # the CUDA head-class attention at the Qwen2.5-0.5B layout and 4K-8K rows
      timeout "$(cap 240)" python3 -m pytest -q -x -rs tests/kernels/test_cuda_kernels.py \
        -k "qwen05_scale or matches_reference or retrieval" > /tmp/rkq/gpu-kernel-scale.log 2>&1; rc=$?
      tail -3 /tmp/rkq/gpu-kernel-scale.log
      # a failing kernel test leaves a mark: the sweep then runs without retrieval points
      [ $rc = 0 ] || { tail -40 /tmp/rkq/gpu-kernel-scale.log; touch /tmp/rkq/kscale-failed; } ;;
    qdiag)
      # RedKnot's torch attention on this GPU on the multi-document tasks (DIAG_ARGS): do
      # the CUDA kernels lose what the method keeps?
      export VLLM_ENABLE_V1_MULTIPROCESSING=0
      timeout "$(cap 300)" python3 benchmarks/quality.py report --model qwen2.5-coder-0.5b \
        --attention torch --workdir /tmp/rkq --out /tmp/rkq/quality-diag-torch.json \
        ${DIAG_ARGS:---tasks multidoc_qa,multidoc_qa_many --lengths 8192 --n 20 --seed 0 --head-config head_class/qwen2.5-coder-0.5b-instruct.json} \
        2>&1 | grep --line-buffered -E "^\[quality\]|Error|error" | tail -20 ;;
    segtests)
      # SegPaged's CUDA path (every-token sink merge, the engine against its torch path),
      # then the rest of the GPU tests
      timeout "$(cap 420)" python3 -m pytest -q -x -rs ${SEGTESTS:-tests/kernels/test_cuda_kernels.py \
        tests/test_gpu_engine.py} > /tmp/rkq/gpu-tests.log 2>&1; rc=$?; tail -3 /tmp/rkq/gpu-tests.log
      # a failure does not stop the call: the benchmarks then measure the eager local path
      # (not graphs that failed their test), and the log says so
      touch /tmp/rkq/done-$step
      if [ $rc != 0 ]; then tail -60 /tmp/rkq/gpu-tests.log; touch /tmp/rkq/segtests-failed; fi ;;
    segpaged)
      [ -f /tmp/rkq/segtests-failed ] && { export VLLM_REDKNOT_SEGPAGED_DECODE_GRAPHS=0
        echo "[gpu_run] segtests failed: SegPaged decode graphs off"; }
      # dense / RedKnot / RedKnot + SegPaged on the 8B shape (SEGPAGED_ARGS); finished
      # engines wait in /tmp/rks while the machine stays warm
      timeout "$(cap 590)" python3 benchmarks/segpaged.py --allow-partial --workdir /tmp/rks \
        --out /tmp/rkq/segpaged-h200.json ${SEGPAGED_ARGS:-} 2>&1 | tee /tmp/rkq/segpaged.raw.log \
        | grep --line-buffered -E "^\[segpaged\]|^\{|Error|error|Traceback" | tail -30
      cp /tmp/rks/segpaged-*.json /tmp/rks/segpaged-*.partial /tmp/rkq/ 2>/dev/null
      ls /tmp/rks/segpaged-dense.json /tmp/rks/segpaged-redknot.json \
        /tmp/rks/segpaged-segpaged.json >/dev/null 2>&1 && touch /tmp/rkq/done-$step ;;
    segquality|segquality-*)
      # Qwen2.5-0.5B with a head config SegPaged can page (each layer's top head global, the
      # other local; segquality: W=2048, segquality-wN: the W=N variant,
      # segquality-ret-w2048: global heads by retrieval score; all written by
      # head_class/make_segpaged_configs.py): dense, RedKnot, RedKnot + SegPaged through
      # the harness (SEGQ_N, SEGQ_LENGTHS), in a work folder per config
      export VLLM_ENABLE_V1_MULTIPROCESSING=0
      w=${step#segquality-}; [ "$w" = segquality ] && w=w2048
      head=head_class/qwen2.5-coder-0.5b-instruct.segpaged-g1of2-$w.json
      tag=g1of2-$w
      # the dense and RedKnot runs of the H200 call that ran out during the SegPaged engine
      # (commit 81d16b1, same specs) seed the cache: dense is not run again (and, for the
      # W=2048 config, RedKnot); SEGQ_SEED=0: all afresh; the log names the seed
      seed=benchmarks/results/raw/segquality-qwen05-runs-81d16b1.tar.gz
      if [ "${SEGQ_SEED:-1}" = 1 ] && [ -f $seed ] && [ -z "${SEGQ_N:-}${SEGQ_LENGTHS:-}" ]; then
        mkdir -p /tmp/rkq/segq-$tag && tar xzf $seed -C /tmp/rkq/segq-$tag && echo "[gpu_run] segquality $tag: seeded from $seed"
      fi
      timeout "$(cap 570)" python3 benchmarks/quality.py report --model qwen2.5-coder-0.5b \
        --head-config "$head" --segpaged \
        --lengths "${SEGQ_LENGTHS:-16384,32768}" --n "${SEGQ_N:-40}" --workdir /tmp/rkq/segq-$tag \
        --out /tmp/rkq/segpaged-quality-qwen05-$tag.json 2>&1 \
        | grep --line-buffered -E "^\[quality\]|Error|error" | tail -20
      [ -f /tmp/rkq/segpaged-quality-qwen05-$tag.json ] && touch /tmp/rkq/done-$step ;;
    pd)
      # head-aware PD vs vLLM's all-heads PD (ExampleConnector) vs co-located, 8B shape (PD_ARGS)
      timeout "$(cap 590)" python3 benchmarks/pd.py --workdir /tmp/rkpd --out /tmp/rkq/pd-h200.json \
        ${PD_ARGS:-} 2>&1 | tee /tmp/rkq/pd.raw.log | grep --line-buffered -E "^\[pd\]|^\{|Error|Traceback" | tail -20
      [ -f /tmp/rkq/pd-h200.json ] && touch /tmp/rkq/done-$step ;;
    ktail)
      # the CUDA kernel tests (the tail pass among them) before any quality run relies on them
      timeout "$(cap 240)" python3 -m pytest -q -x -rs tests/kernels/test_cuda_kernels.py \
        > /tmp/rkq/gpu-kernel-tests.log 2>&1; rc=$?; tail -3 /tmp/rkq/gpu-kernel-tests.log
      [ $rc = 0 ] || { tail -40 /tmp/rkq/gpu-kernel-tests.log; break; } ;;
    headprofile)
      # profile a registry model's heads on the GPU, short and long context (PROFILE_ARGS),
      # into /tmp/rkq/profile.json (the sweep's --scores)
      timeout "$(cap ${PROFILE_TIMEOUT:-400})" python3 -m redknot_vllm.cli profile ${PROFILE_MODEL:-qwen2.5-coder-0.5b} \
        --out /tmp/rkq/profile.json --device cuda --no-progress \
        ${PROFILE_ARGS:---windows 512,1024,2048,4096 --window 2048 --long-tokens 16384 --long-windows 1024,2048,4096 --long-needles 8} \
        2>&1 | grep -v -E "^\(EngineCore|it/s" | tail -15 ;;
    qsweep|qreport)
      # quality on a registry model (SWEEP_ARGS / REPORT_ARGS: --scores/--head-config, --grid,
      # --tails, --n ...); finished engines are cached in /tmp/rkq while the machine stays warm
      export VLLM_ENABLE_V1_MULTIPROCESSING=0
      if [ $step = qsweep ]; then args=${SWEEP_ARGS:-}; else args=${REPORT_ARGS:-}; fi
      if [ $step = qsweep ] && [ -f /tmp/rkq/kscale-failed ] && [[ "$args" == *--retrieval-points* ]]; then
        echo "[gpu_run] kscale failed: the sweep runs without its retrieval points"
        args=$(sed -E 's/--retrieval-points +[^ ]+//' <<<"$args")
      fi
      # the sweep's default may come with a sparse-FFN schedule: the report measures it too
      if [ $step = qreport ] && [ -f /tmp/rkq/default/sparse_ffn.json ] && [[ "$args" != *--sparse-ffn* ]]; then
        args="$args --sparse-ffn /tmp/rkq/default/sparse_ffn.json"
      fi
      timeout "$(cap 590)" python3 benchmarks/quality.py ${step#q} --model ${QUALITY_MODEL:-qwen2.5-coder-0.5b} \
        --lengths ${QUALITY_LENGTHS:-8192,16384,32768} --workdir /tmp/rkq --out "/tmp/rkq/quality-${step#q}.json" \
        $args 2>&1 | grep --line-buffered -E "^\[(quality|sweep)\]|Error|error" | tail -40 ;;
    qttft)
      # TTFT of the shipped Qwen default against dense, same run, compiled + CUDA graphs
      # (QTTFT_MODEL qwen05shape: the same shape with random weights, a 3-part bundle)
      # (QTTFT_ARGS: e.g. --enforce-eager --head-config /tmp/rkq/default/head_config.json)
      timeout "$(cap 400)" python3 benchmarks/ttft.py --model ${QTTFT_MODEL:-qwen05} ${QTTFT_ARGS:-} \
        --out /tmp/rkq/ttft-qwen05.json \
        2>&1 | tee /tmp/rkq/ttft-qwen05.raw.log | grep --line-buffered -v -E "^\(EngineCore|INFO|WARNING|it/s" | tail -12 ;;
    qprofile)
      # where the compiled engines' time goes (QPROFILE_MODEL qwen05 or qwen05shape): torch
      # profile of one prefill, cProfile of that prefill and of 64 decode steps, per engine
      timeout "$(cap 500)" python3 benchmarks/ttft.py --model ${QPROFILE_MODEL:-qwen05} \
        --profile-len ${QPROFILE_LEN:-16384} --engines ${QPROFILE_ENGINES:-redknot dense} \
        ${QPROFILE_ARGS:-} --out /tmp/rkq/x.json 2>&1 | tee /tmp/rkq/qprofile.raw.log \
        | grep --line-buffered -E "^\[|Error|error|Traceback|Self CUDA time" | tail -12 ;;
    load)
      # the OpenAI server under load: dense vs RedKnot `vllm serve`, same run
      timeout ${LOAD_TIMEOUT:-570} python3 benchmarks/load.py --out "$OUT/load-h200.json" \
        --workdir /tmp/rkl ${LOAD_ARGS:-} 2>&1 | grep --line-buffered -E "^\[load\]|Error|error|Traceback|^ " | tail -40 ;;
    smollm2|llama8b)
      args=(${TTFT_ARGS:-})
      if [ "$step" = smollm2 ]; then
        # in-process engines (see sweep); the config the sweep chose, when it ran
        export VLLM_ENABLE_V1_MULTIPROCESSING=0
        [ -f /tmp/rkq/default/head_config.json ] && args+=(--head-config /tmp/rkq/default/head_config.json)
        [ -f /tmp/rkq/default/sparse_ffn.json ] && args+=(--sparse-ffn /tmp/rkq/default/sparse_ffn.json)
      fi
      timeout 540 python3 benchmarks/ttft.py --model "$step" --out "$OUT/ttft-$step.json" \
        "${args[@]}" 2>&1 | tee "$OUT/ttft-$step.raw.log" | grep --line-buffered -v -E "^\(EngineCore|INFO|WARNING|it/s" | tail -20 ;;
  esac
  rc=${PIPESTATUS[0]}
  # a step counts as done when its output exists (pipelines end in tail/grep)
  case $step in
    headprofile) [ -f /tmp/rkq/profile.json ] && touch /tmp/rkq/done-$step ;;
    qsweep|qreport) [ -f /tmp/rkq/quality-${step#q}.json ] && touch /tmp/rkq/done-$step ;;
    qttft) [ -f /tmp/rkq/ttft-qwen05.json ] && touch /tmp/rkq/done-$step ;;
    qdiag) [ -f /tmp/rkq/quality-diag-torch.json ] && touch /tmp/rkq/done-$step ;;
    qprofile) ls /tmp/rkq/profile-*.profile.txt >/dev/null 2>&1 && touch /tmp/rkq/done-$step ;;
    qwen05|ktail|qrestore|kscale) touch /tmp/rkq/done-$step ;;
  esac
  [ -f "/tmp/rkq/done-$step" ] || { echo "[gpu_run] $step did not finish (rc $rc)"; break; }
done
# what comes back (8 files at most): the results and every run, packed
if [ -d /tmp/rkq ] && [ -n "${OUT:-}" ]; then
  for f in profile.json quality-sweep.json quality-report.json ttft-qwen05.json segpaged-h200.json \
      segpaged-quality-qwen05.json pd-h200.json; do
    [ -f /tmp/rkq/$f ] && cp /tmp/rkq/$f "$OUT/"
  done
  tar czf "$OUT/rkq.tar.gz" -C /tmp/rkq --exclude='*.tar.gz' . 2>/dev/null
fi
