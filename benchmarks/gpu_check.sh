#!/usr/bin/env bash
# One GPU check, <= 8 minutes on one GPU: kernel tests on CUDA, the step kernel against the bytes it must move (fraction
# of a copy bandwidth measured in the same run), decoding (Qwen3-0.6B shape, 100k items, beams 32) vs HF, training
# throughput + MFU of the Qwen3-0.6B shape in bf16 with ZeRO-2 on 1 GPU (flash-attn when installed, else SDPA), and
# every benchmark registered below. Writes benchmarks/results/*_gpu.json (with provenance).
#
#   benchmarks/gpu_check.sh              # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run    # every piece at toy size on CPU (< 3 min on 2 idle cores), results to a temp dir
#   benchmarks/gpu_check.sh --quality    # ONLY the quality check (its own budget, QUALITY_SECONDS = 480): the Beauty
#       ablation rows popular sasrec base ia ia_r ia_r_rl of conf/experiment/beauty_ablation.yaml, from scratch, into
#       QUALITY_OUT (default /tmp/quality_beauty; resumable: a rerun skips finished rows) from QUALITY_DATA_DIR (default
#       ../shared/data/beauty, which does not travel to the device machine: copy it into an ignored folder of the
#       checkout, carry it and point QUALITY_DATA_DIR there). Writes benchmarks/results/ablation_beauty_ablation_gpu.*
#   benchmarks/gpu_check.sh --quality --dry-run   # the same rows at toy size on CPU (~5 min on 2 cores)
#
# Packages: torch / triton / transformers are expected installed. Others (deepspeed, ray, peft, hydra-core, ...) are
# installed from a carried wheelhouse .whl/ when present (pip --no-index --target /tmp/site, see
# /work/.library/device/README.md); a piece whose modules are missing is SKIPPED with a message, not failed.
# Environment: PYTHON (default .venv/bin/python if present, else python3); GPU_CHECK_ALLOW_DIRTY=1 passes
# --allow-dirty (recorded in the results) when the copy of the tree has no clean git state.
# Exit status: 0 when no piece failed (skips allowed), 1 otherwise.
#
# To register a benchmark: ONE line `register NAME "MODULES" "GPU COMMAND" "DRY-RUN COMMAND"` below. Commands may use
# $PY, $FLAGS (--allow-dirty or nothing) and $DRY_OUT (the dry run's results folder).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
QUALITY=0
for arg in "$@"; do
    case $arg in
        --dry-run) MODE=dry ;;
        --quality) QUALITY=1 ;;
        *) echo "gpu_check: unknown argument $arg (allowed: --dry-run, --quality)"; exit 2 ;;
    esac
done
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled \
    PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
# the repo's packages without installing it (kernels/ is installed as onerec_kernels, launch/ as onerec_launch)
SHIM=$(mktemp -d /tmp/gpu_check_path.XXXXXX)
ln -s "$PWD/kernels" "$SHIM/onerec_kernels" && ln -s "$PWD/launch" "$SHIM/onerec_launch" && ln -s "$PWD/conf" "$SHIM/onerec_conf"
export PYTHONPATH="$PYTHONPATH:$SHIM"
FLAGS=""
[[ "${GPU_CHECK_ALLOW_DIRTY:-0}" == "1" ]] && FLAGS="--allow-dirty"
DRY_OUT=""
if [[ $MODE == dry ]]; then
    DRY_OUT=$(mktemp -d /tmp/gpu_check_dry.XXXXXX)
    FLAGS="--allow-dirty"  # toy results go to $DRY_OUT, never to benchmarks/results
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    export TRITON_INTERPRET=0  # tests/conftest.py only sets it when unset: real kernels on the GPU
    if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/site" || echo "gpu_check: installing the wheelhouse .whl/ failed"
    fi
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: no CUDA device visible to $PY (use --dry-run on CPU)"; exit 1; }
fi

NAMES=(); MODULES=(); GPU_CMDS=(); DRY_CMDS=()
register() { NAMES+=("$1"); MODULES+=("$2"); GPU_CMDS+=("$3"); DRY_CMDS+=("$4"); }

# ---- the registry: name, modules it needs, GPU command, dry-run command ---------------------------------------------
register kernel_tests "pytest hypothesis triton onerec_kernels" \
    "$PY -m pytest -q -x -o addopts= tests/test_constrained_step_kernel.py" \
    "$PY -m pytest -q -x -o addopts= tests/test_constrained_step_kernel.py -k 'hand_worked or strided'"
register constrained_step "triton onerec_kernels" \
    "$PY benchmarks/bench_constrained_step.py --device cuda $FLAGS" \
    "$PY benchmarks/bench_constrained_step.py --device cpu --quick --dtypes fp32 $FLAGS --out-dir $DRY_OUT"
register decoding "transformers onerec_kernels" \
    "$PY benchmarks/bench_constrained_decoding.py --device cuda --presets qwen3-0.6b --catalogues 100k:4x256 --beams 32 --users 64 $FLAGS" \
    "$PY benchmarks/bench_constrained_decoding.py --device cpu --quick --presets tiny --catalogues 2k:4x256 --beams 4 --users 4 $FLAGS --out-dir $DRY_OUT"
register training "deepspeed ray" \
    "$PY benchmarks/bench_training.py --device cuda --preset qwen3-0.6b --precision bf16 --workers 1 --zero-stages 2 --micro-batches 4 --seq-len 1024 --warmup-steps 3 --steps 8 $FLAGS" \
    "$PY benchmarks/bench_training.py --device cpu --preset tiny --workers 1 --zero-stages 2 --micro-batches 2 --seq-len 32 --warmup-steps 1 --steps 2 --repeats 3 --no-scaling-md $FLAGS --out-dir $DRY_OUT"
register loss_memory "transformers" \
    "$PY benchmarks/bench_loss_memory.py --device cuda $FLAGS" \
    "$PY benchmarks/bench_loss_memory.py --device cpu --quick --vocab 8192 --length 128 $FLAGS --out-dir $DRY_OUT"
register think_ahead "transformers pyarrow" \
    "$PY benchmarks/bench_think_ahead.py --device cuda --preset small --items 20000 --codebooks 32x32x32 --users 64 --think-tokens 64 $FLAGS" \
    "$PY benchmarks/bench_think_ahead.py --device cpu --items 100 --codebooks 4x5x5 --users 4 --think-tokens 4 --rationales 2 --growth-t 1,2 --growth-b 2 --repeats 3 $FLAGS --out-dir $DRY_OUT"
register rl_step "transformers trl datasets" \
    "$PY benchmarks/bench_rl_step.py --device cuda --size gpu $FLAGS" \
    "$PY benchmarks/bench_rl_step.py --device cpu --quick $FLAGS --out-dir $DRY_OUT"
# ----------------------------------------------------------------------------------------------------------------------

SECONDS_PER_PIECE=${GPU_CHECK_PIECE_TIMEOUT:-$([[ $MODE == dry ]] && echo 150 || echo 240)}
if [[ $QUALITY == 1 ]]; then  # the quality check alone, with its own budget
    QUALITY_ROWS="popular sasrec base ia ia_r ia_r_rl"
    QUALITY_DATA="--set data.dir=${QUALITY_DATA_DIR:-../shared/data/beauty}"
    # toy size on CPU: one worker, fp32, a few steps and users
    QUALITY_TOY="trainer.use_gpu=false trainer.precision=fp32 eval.device=cpu eval.sasrec.device=cpu
        trainer.max_epochs=null align.warmup.max_steps=2 align.multitask.max_steps=3 align.multitask.num_examples=400
        reasoning.bootstrap.max_examples=40 reasoning.sft.max_steps=2 rl.max_steps=2 rl.group_size=2
        rl.prompts_per_rank=1 rl.max_think_tokens=8 rl.beam_width=10 eval.max_users=16 eval.batch_size=16
        eval.reasoning.max_think_tokens=8 eval.sasrec.max_seconds=5 ablation.num_resamples=100"
    NAMES=(); MODULES=(); GPU_CMDS=(); DRY_CMDS=()
    register quality "deepspeed ray hydra omegaconf transformers pyarrow" \
        "$PY benchmarks/ablation_table.py ${QUALITY_OUT:-/tmp/quality_beauty} --experiment beauty_ablation --device cuda --rows $QUALITY_ROWS $QUALITY_DATA $FLAGS" \
        "$PY benchmarks/ablation_table.py $DRY_OUT/quality_beauty --experiment beauty_ablation --device cpu --rows $QUALITY_ROWS $QUALITY_DATA $(printf -- '--set %s ' $QUALITY_TOY) $FLAGS --out-dir $DRY_OUT"
    SECONDS_PER_PIECE=${QUALITY_SECONDS:-$([[ $MODE == dry ]] && echo 900 || echo 480)}
fi
STARTED=$(date +%s)
FAILED=0
SUMMARY=()
for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]}
    missing=$("$PY" - "${MODULES[$i]}" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1].split() if importlib.util.find_spec(m) is None))
EOF
)
    if [[ -n "$missing" ]]; then
        msg="SKIP $name: module(s) $missing not installed (carry their wheels in .whl/, see /work/.library/device/README.md)"
        echo "gpu_check: $msg"; SUMMARY+=("$msg"); continue
    fi
    cmd=$([[ $MODE == dry ]] && echo "${DRY_CMDS[$i]}" || echo "${GPU_CMDS[$i]}")
    echo "gpu_check: === $name: $cmd"
    t0=$(date +%s)
    timeout "$SECONDS_PER_PIECE" bash -c "$cmd"
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    if [[ $rc -eq 0 ]]; then SUMMARY+=("OK   $name (${dt} s)"); else SUMMARY+=("FAIL $name (rc $rc, ${dt} s)"); FAILED=1; fi
done
echo "gpu_check: ---- summary ($MODE, $(( $(date +%s) - STARTED )) s) ----"
printf '  %s\n' "${SUMMARY[@]}"
[[ $MODE == dry ]] && ls "$DRY_OUT"
if [[ $FAILED -eq 0 ]]; then echo "gpu_check: $MODE OK"; else echo "gpu_check: $MODE FAILED"; fi
exit $FAILED
