#!/usr/bin/env bash
# The GPU runs of this project, in parts that each fit one 10-minute device call. Every part writes its logs and
# results under /tmp/gpu_session/<part>/; after every step they are packed into OUT/logs.tgz (the device tool returns at
# most 8 files) next to OUT/summary.txt, which is also printed last.
#
#   bash benchmarks/gpu_session.sh OUT tests             # GPU tests of kernels, layers and generation (~6 min)
#   bash benchmarks/gpu_session.sh OUT kda_tests         # only the end-to-end chunk/recurrent KDA GPU tests (~4 min)
#   bash benchmarks/gpu_session.sh OUT kda_candidates    # compiled part tests of the shipped forward setting and
#                                                        # the UT-transform placements the sweep times, bf16
#                                                        # included (~3 min; CANDIDATES=-k expression to choose)
#   bash benchmarks/gpu_session.sh OUT sweep8k           # the forward candidates' sweep at T = 8192 only, FLA beside (~3 min)
#   bash benchmarks/gpu_session.sh OUT kernels           # chunk/decode kernel benchmark vs FLA with the sweep (~6 min)
#   bash benchmarks/gpu_session.sh OUT fused             # the fused conv / preprocessing kernels: speed (+ sweep), tests
#   bash benchmarks/gpu_session.sh OUT speed             # whole-model prefill/decode vs HF transformers + FLA (~7 min)
#   bash benchmarks/gpu_session.sh OUT model             # MLA decode, model efficiency, training throughput (~8 min)
#   bash benchmarks/gpu_session.sh OUT experiments       # synthetic tasks: the 2026-12-03 cells (~6 min)
#   bash benchmarks/gpu_session.sh OUT ablation          # hybrid ablation, seed 1 (~3 min)
#
# Installs FLA 0.6.0 from .whl/ when it is there (the peer in the kernel benchmark; DESIGN.md §5).
set -uo pipefail
OUT=${1:?usage: gpu_session.sh OUT PART...}
shift
WORK=/tmp/gpu_session
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:.
fi
export PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$OUT" "$WORK"
touch "$OUT/summary.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader

step() {  # step PART NAME SECONDS COMMAND...: run with a time limit, log to WORK/PART/NAME.log, report the status
    local part=$1 name=$2 limit=$3
    shift 3
    mkdir -p "$WORK/$part"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$WORK/$part/$name.log" 2>&1
    local rc=$?
    echo "[$part/$name] rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    grep -E "passed|failed|error" "$WORK/$part/$name.log" | tail -2
    tar czf "$OUT/logs.tgz" -C "$WORK" .  # after every step, so a call cut off at its limit still returns the logs
}

for part in "$@"; do
    case $part in
    tests | kda_tests)
        step tests kda 360 python -m pytest -q -p no:cacheprovider -rf -m gpu tests/ops/test_kda_chunk_triton.py \
            tests/ops/test_kda_recurrent_triton.py
        [ "$part" = kda_tests ] && continue
        step tests kda_parts 300 python -m pytest -q -p no:cacheprovider -rf tests/ops/test_kda_chunk_fwd_parts.py \
            tests/ops/test_kda_chunk_bwd_parts.py
        step tests model 150 python -m pytest -q -p no:cacheprovider -rf -m gpu tests/ops/test_mla_decode.py \
            tests/layers tests/test_generate.py tests/test_model.py
        ;;
    kda_candidates)
        step tests kda_candidates "${CANDIDATES_LIMIT:-330}" python -m pytest -q -p no:cacheprovider -rf \
            tests/ops/test_kda_chunk_fwd_parts.py -k "${CANDIDATES:-chunk-default or chunk-solve-wy or chunk-solve-offdiag}"
        ;;
    sweep8k)
        step kernels sweep8k 240 python benchmarks/kda_kernels.py --out "$WORK/kernels" --sweep --T 8192 \
            --decode-batches 1 --breakdown
        grep -E "sweep 8k|^\{" "$WORK/kernels/sweep8k.log"
        ;;
    kernels)
        step kernels kda_kernels 380 python benchmarks/kda_kernels.py --out "$WORK/kernels" --sweep
        tail -8 "$WORK/kernels/kda_kernels.log"
        ;;
    fused)
        step fused conv_speed 180 python benchmarks/conv_speed.py --sweep --out "$WORK/fused/conv_speed.json"
        tail -12 "$WORK/fused/conv_speed.log"
        step fused preprocess_speed 90 python benchmarks/kda_preprocess_speed.py --out "$WORK/fused/kda_preprocess.json"
        tail -8 "$WORK/fused/preprocess_speed.log"
        step fused tests 300 python -m pytest -q -p no:cacheprovider -rf tests/ops/test_conv_triton.py \
            tests/ops/test_kda_preprocess_triton.py
        ;;
    speed)
        python -c "import transformers; print('transformers', transformers.__version__)" || echo "no transformers"
        step speed model_speed 390 python benchmarks/model_speed.py --out "$WORK/speed" --compare-backends
        tail -16 "$WORK/speed/model_speed.log"
        ;;
    model)
        step model mla_decode 90 python benchmarks/mla_decode.py --sweep --out "$WORK/model/mla_decode.json"
        step model efficiency 280 python benchmarks/model_efficiency.py --out "$WORK/model" --budget-s 240
        step model train_speed 140 python benchmarks/train_speed_gpu.py --out "$WORK/model"
        tail -4 "$WORK/model/train_speed.log"
        ;;
    experiments)
        # the cells run on 2026-12-03 (experiments/RESULTS.md): per-head dt init on Palindrome, Mamba2 beyond 256,
        # a second lr at 1024
        step experiments palindrome_dt_per_head 150 python experiments/synthetic.py --device cuda \
            --out "$WORK/experiments/palindrome_dt_per_head" --tasks palindrome --mixers kda --lengths 1024 2048 \
            --lrs 1e-3 --steps 3000 --run-seconds 28 --kda-dt-init per-head
        step experiments mamba2 220 python experiments/synthetic.py --device cuda --out "$WORK/experiments/mamba2" \
            --tasks mqar palindrome stack --mixers mamba2 --lengths 1024 2048 --lrs 1e-3 --steps 3000 \
            --run-seconds 25 --time-budget 170
        step experiments lr_sweep 200 python experiments/synthetic.py --device cuda --out "$WORK/experiments/lr_sweep" \
            --tasks palindrome --mixers kda gdn --lengths 1024 --lrs 3e-3 3e-4 --steps 3000 --run-seconds 28 \
            --time-budget 150
        ;;
    ablation)
        step ablation hybrid_ablation 280 python experiments/hybrid_ablation.py --device cuda --steps auto \
            --time-budget 200 --out "$WORK/ablation" --tag h200_seed1 --seed 1
        ;;
    *)
        echo "unknown part $part (tests, kda_tests, kda_candidates, kernels, fused, speed, model, experiments, ablation)" >&2
        ;;
    esac
done
tar czf "$OUT/logs.tgz" -C "$WORK" .
echo
cat "$OUT/summary.txt"
