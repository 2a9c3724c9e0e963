#!/usr/bin/env bash
# Every GPU benchmark of glm130b in one command: each runs its correctness check first, then its
# timing; one summary table prints last (figure, goal, baseline measured in the same run, ratio).
#
#   benchmarks/gpu_suite.sh                         # one H100/H200: at most 9 minutes in all
#   benchmarks/gpu_suite.sh --small --device cpu    # the same plumbing at toy sizes (CI: tests/test_gpu_suite.py)
#
# Needs only a python3 with torch, triton, transformers and safetensors (no pip, no network, no venv):
# the sources come from src/ through PYTHONPATH. PYTHON picks another interpreter. Details go under
# $OUT (a new temporary directory when unset): <benchmark>.log, each benchmark's JSON, summary/*.json.
# Exit status: 0 when every benchmark passed its checks within its budget.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

SMALL=0
DEVICE=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --small) SMALL=1 ;;
        --device) DEVICE=$2; shift ;;
        *) echo "gpu_suite.sh: unknown argument $1 (use --small and --device DEVICE)" >&2; exit 2 ;;
    esac
    shift
done

TOTAL_BUDGET_S=540  # 9 minutes on one H100/H200 for everything below, compile and checks included
SMALL_LIMIT_S=900   # per benchmark at toy sizes on a CPU (the Triton interpreter is slow)

# ------------------------------------------------------------------------------------ the benchmarks
# One line each: name | script in benchmarks/ | arguments on the GPU | extra arguments with --small | budget (s).
# A benchmark takes --small and --device, checks correctness before it times anything, exits non-zero
# on a failed check, and records its headline figures with suite_summary.write_summary(name, rows).
# Serving and evaluation benchmarks: add their lines here; the budgets must sum to <= TOTAL_BUDGET_S.
# The budgets are limits guessed from CPU runs and FLOP counts: no GPU has run this list yet. The
# first GPU run's times go into RESULTS.md, and these numbers follow them.
BENCHMARKS=(
    "quant_kernels|bench_quant_kernels.py|--rows 1|--rows 1|75"
    "generation|bench_generation.py|--repeats 2 --batches 1 --skip-1b-int4|--no-compile --repeats 1 --new-tokens 4 --batches 1 --skip-1b-int4|165"
    "prefix_attention|bench_prefix_attention.py|||75"
    "train_mfu|bench_train_mfu.py|--backends sdpa,auto --steps 10|--backends sdpa,auto|125"
    "inference_memory|bench_inference_memory.py|||20"
    "finetune|bench_finetune.py|--no-toy|--no-toy|80"
)
# ------------------------------------------------------------------------------------ end of the list

total=0
for entry in "${BENCHMARKS[@]}"; do
    IFS='|' read -r _ _ _ _ budget <<< "$entry"
    total=$((total + budget))
done
if [ "$total" -gt "$TOTAL_BUDGET_S" ]; then
    echo "gpu_suite.sh: the budgets sum to ${total} s, over the ${TOTAL_BUDGET_S} s the suite may take; shrink one" >&2
    exit 2
fi

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
machine=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', '| torch', torch.__version__)" 2>&1 | tail -1)
echo "glm130b GPU suite: $machine | commit $commit | details in $OUT"
: > "$OUT/suite_status.tsv"
failed=0
for entry in "${BENCHMARKS[@]}"; do
    IFS='|' read -r name script gpu_args small_args budget <<< "$entry"
    if [ "$SMALL" = 1 ]; then
        args="--small --device $DEVICE $small_args"
        limit=$SMALL_LIMIT_S
    else
        args="--device $DEVICE $gpu_args"
        limit=$budget
    fi
    start=$SECONDS
    # shellcheck disable=SC2086  # the arguments are words
    timeout --kill-after=10 "$limit" "$PYTHON" "benchmarks/$script" $args > "$OUT/$name.log" 2>&1
    code=$?
    seconds=$((SECONDS - start))
    printf '%s\t%s\t%s\n' "$name" "$code" "$seconds" >> "$OUT/suite_status.tsv"
    if [ "$code" = 0 ]; then
        echo "[suite] $name: ok in ${seconds} s"
    else
        failed=1
        echo "[suite] $name: exit $code after ${seconds} s (limit ${limit} s); the end of $OUT/$name.log:"
        tail -n 15 "$OUT/$name.log" | sed 's/^/    /'
    fi
done
echo
"$PYTHON" benchmarks/suite_summary.py "$OUT"
exit $failed
