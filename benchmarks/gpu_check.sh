#!/usr/bin/env bash
# The GPU check: one prepared run for one CUDA GPU (H100/H200 class) that fits in 10 minutes.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same plumbing on CPU at toy sizes (about 2 minutes)
#
# Steps, each under its own `timeout`, each run whatever the previous one returned (exit codes in steps.tsv):
#   1. nvidia-smi and the software versions;
#   2. the test suite (`pytest -q tests -x`; the suite has no CUDA-only tests, so this checks the install on the
#      GPU machine's CPU side);
#   3. `mhmoe bench layers` on cuda in bf16 with MFU against MHMOE_PEAK_TFLOPS;
#   4. `mhmoe train --preset gpu` for smoe, then mhmoe-h3, about 2 minutes each, stopped by the time limit
#      (exit 124 is the plan there): tokens/s and MFU from each run's metrics.jsonl;
#   5. summary.md and summary.json (benchmarks/gpu_check_summary.py).
#
# Environment:
#   OUT                 output folder (default gpu_check_out); must not hold an earlier check
#   PYTHON              interpreter with torch (default python3); the repository is put first on PYTHONPATH
#   MHMOE_PEAK_TFLOPS   the GPU's peak for bf16 (default 989, the dense bf16 figure sold for H100/H200 SXM;
#                       set it for any other part: every MFU is relative to it; 0.1 in a dry run)
#   MHMOE_DATA_ROOT     corpora for step 4 (default: ../shared/data next to the repository if present, else the
#                       corpus sample carried in mhmoe/data/sample_data, which holds GPT-2's tokenizer too)
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg'; use --cpu-dry-run or nothing" >&2; exit 2 ;;
    esac
done

OUT="${OUT:-gpu_check_out}"
PY="${PYTHON:-python3}"
# A dry run's MFU is plumbing only: a 0.1 TFLOP/s "peak" keeps its percentages readable on a CPU.
if [ "$DRY_RUN" = 1 ]; then PEAK="${MHMOE_PEAK_TFLOPS:-0.1}"; else PEAK="${MHMOE_PEAK_TFLOPS:-989}"; fi
if [ -e "$OUT/steps.tsv" ]; then
    echo "gpu_check.sh: $OUT already holds a check; set OUT to a new folder or remove it" >&2
    exit 2
fi
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Nothing outside the machine may be reachable: transformers' hub kernels must fail at once, not retry.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MHMOE_PEAK_TFLOPS="$PEAK"
DATA_ROOT="${MHMOE_DATA_ROOT:-}"
for cand in "$REPO/../shared/data" "$REPO/shared/data" "$REPO/mhmoe/data/sample_data"; do
    if [ -z "$DATA_ROOT" ] && [ -d "$cand" ]; then DATA_ROOT="$(cd "$cand" && pwd)"; fi
done

if [ "$DRY_RUN" = 1 ]; then
    # Seconds allowed per step, then the arguments that make each step small enough for a CPU.
    T_TESTS=120; T_BENCH=90; T_TRAIN=40
    TEST_ARGS=(tests/e2e/test_bench.py -k "order_statistic or sampling or median_ci")
    BENCH_ARGS=(--device cpu --dtypes float32 --tokens 64 --dim 96 --hidden-dim 256 --num-experts 4 --no-hf
                --max-seconds 3 --peak-tflops "$PEAK")
    # A fixed number of steps: the dry run checks the plumbing, so every step ends by itself (exit 0).
    TRAIN_ARGS=(--preset smoke --set device=cpu --set steps=40)
else
    # 10 minutes in all: versions and nvidia-smi ~15 s, 140 + 90 + 2 x 120, the summary ~5 s: about 9.5
    # minutes when every step runs to its limit.
    T_TESTS=140; T_BENCH=90; T_TRAIN=120
    TEST_ARGS=(tests)
    if "$PY" -c "import xdist" 2>/dev/null; then TEST_ARGS+=(-n 8 --dist loadfile); fi
    # 16384 tokens keep an H100 busier than the CPU default of 4096; 40 s of rounds leaves time for the checks.
    BENCH_ARGS=(--device cuda --dtypes bfloat16 --tokens 16384 --impls "sorted,grouped_mm" --max-seconds 40
                --peak-tflops "$PEAK")
    # Steps far beyond the limit: the time limit ends the run (exit 124 is the plan there).
    TRAIN_ARGS=(--preset gpu --set steps=1000000)
fi

# record NAME RC T0: one line of steps.tsv.
record() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$(( $(date +%s) - $3 ))" "$1.log" >> "$OUT/steps.tsv"
    echo "   exit $2 after $(( $(date +%s) - $3 )) s"
}

# run_step NAME LIMIT_S CMD...: CMD's output in NAME.log (stdout and stderr), its exit code and wall time in
# steps.tsv. SIGINT first, so a stopped `mhmoe train` ends cleanly; SIGKILL 15 s later if it does not.
run_step() {
    local name="$1" limit="$2" t0
    shift 2
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    record "$name" $? "$t0"
}

versions() {
    echo "date: $(date -Is)"
    echo "dry_run: $DRY_RUN"
    echo "peak_tflops: $PEAK"
    echo "data_root: $DATA_ROOT"
    echo "uname: $(uname -a)"
    echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    grep -m1 "model name" /proc/cpuinfo 2>/dev/null
    echo "cpus: $(nproc 2>/dev/null)"
    timeout 60 "$PY" -c 'import sys, torch
print("python:", sys.version.split()[0])
print("torch:", torch.__version__)
print("cuda:", torch.version.cuda)
print("cuda_available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}", f"{p.multi_processor_count} SMs")'
}

gpu_info() {
    if ! command -v nvidia-smi > /dev/null; then
        echo "nvidia-smi: not found"
        if [ "$DRY_RUN" = 1 ]; then echo "no GPU (dry run)"; return 0; fi
        return 127
    fi
    timeout 20 nvidia-smi || return $?
    timeout 20 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version \
        --format=csv
}

printf 'step\texit_code\tseconds\tlog\n' > "$OUT/steps.tsv"
cd "$REPO" || exit 2
for fn in versions gpu_info; do
    t0=$(date +%s)
    echo "== $fn"
    "$fn" > "$OUT/$fn.log" 2>&1
    record "$fn" $? "$t0"
done
run_step tests "$T_TESTS" "$PY" -m pytest -q -x -p no:cacheprovider "${TEST_ARGS[@]}"
# The records (JSON) on stdout, the progress on stderr: apart, so a failure leaves both readable.
t0=$(date +%s)
echo "== bench_layers (limit ${T_BENCH}s)"
timeout --signal=INT --kill-after=15 "$T_BENCH" "$PY" -m mhmoe.cli bench layers --json "${BENCH_ARGS[@]}" \
    > "$OUT/bench_layers.json" 2> "$OUT/bench_layers.log"
record bench_layers $? "$t0"
for model in smoe mhmoe-h3; do
    # No evaluation and no checkpoint on the way.
    run_step "train_$model" "$T_TRAIN" "$PY" -m mhmoe.cli train "${TRAIN_ARGS[@]}" --model "$model" \
        --out "$OUT/train_$model" --data-root "$DATA_ROOT" --cache-dir "$OUT/cache" --no-progress \
        --set eval_every=0 --set ckpt_every=1000000
done
run_step summary 60 "$PY" benchmarks/gpu_check_summary.py "$OUT"

echo "== steps"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
if [ -f "$OUT/summary.md" ]; then
    echo "== $OUT/summary.md"
    cat "$OUT/summary.md"
else
    # The summary script failed: steps.tsv is the summary.
    cp "$OUT/steps.tsv" "$OUT/summary.md"
fi
