#!/usr/bin/env bash
# The GPU check: one prepared run for one CUDA GPU (H100/H200 class) that fits in one 10-minute call.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same plumbing on CPU at toy sizes (2-3 minutes)
#
# Steps, each under its own `timeout` and run whatever the previous one returned (exit codes in steps.tsv).
# The whole check ends within TOTAL_S = 570 s: a step's limit is cut to what is left of it (less 60 s kept for the
# summary and the packing), so the check's worst case is 570 s. Budget on an H100/H200, limit / expected:
#   1. versions       40 s /  ~10 s  python, torch, CUDA, triton, transformers, the GPU;
#   2. gpu_info       30 s /   ~3 s  nvidia-smi and a CSV of clocks, power limit, driver;
#   3. tests          90 s /  ~60 s  a targeted subset (TESTS below): profiling and its labels under compile,
#                                    compile without graph breaks, the experts' dispatches, the bench and this
#                                    check's summary; the fused-kernel tests too once they exist;
#   4. fallback       75 s /  ~40 s  benchmarks/gpu_fallback_check.py: the five Table 1 models at the gpu preset
#                                    on CUDA: every MoE layer on the dispatch $EXPECT (default scatter), 0 graph
#                                    breaks in the compiled training forward; exit 1 otherwise;
#   5. bench_layers   80 s /  ~50 s  `mhmoe bench layers` at d=768, 16384 tokens, bf16: every layer on what
#                                    dispatch="auto" picks on CUDA, plus grouped_mm and sorted, and transformers'
#                                    Mixtral blocks; 25 s of shuffled rounds; MFU against $MHMOE_PEAK_TFLOPS;
#   6. gpu9min        90 s /  ~60 s  benchmarks/gpu_9min_check.py: one seed of smoe and mhmoe-h3 of the gpu-9min
#                                    preset, trained and evaluated as `mhmoe reproduce` does, from its token pack
#                                    ($PACK, default packs/gpu-9min: build it with `mhmoe data pack --preset
#                                    gpu-9min --data-root DIR --out packs/gpu-9min` and carry it): the measured
#                                    time per run and the 15-run matrix extrapolated from it;
#   7. bench_train   300 s / ~80 s eager, ~300 s compiled
#                                    `mhmoe bench train` of the five variants at the gpu preset (d=384, 12 layers,
#                                    64 x 1024-token micro-batches, 2 per step, vocab 50,304), each step as `mhmoe
#                                    train` runs it (AdamW, bf16 autocast, the preset's compile mode, or $COMPILE),
#                                    on random tokens: 20 timed steps each in shuffled rounds (tokens/s, MFU, x SMoE
#                                    with 95% intervals), and a profile of 2 steps of smoe and mhmoe-h3;
#   8. summary        30 s /   ~3 s  summary.md and summary.json with the acceptance lines;
#   then the step logs are packed into logs.tar.gz.
# Outputs, all in $OUT (at most 8 files, none deeper than one folder, none near 16 MiB):
#   steps.tsv, summary.md, summary.json, logs.tar.gz (every step's log and JSON: logs/<step>.log,
#   logs/bench_layers.json, logs/bench_train.json, logs/fallback.json, logs/gpu9min.json), profile/profile.md,
#   profile/profile.json, profile/trace.json (trace.json.gz when larger than 12 MiB).
#
# Environment:
#   OUT                 output folder (default gpu_check_out); must not hold an earlier check
#   PYTHON              interpreter with torch (default python3); the repository is put first on PYTHONPATH
#   MHMOE_PEAK_TFLOPS   the GPU's peak for bf16 (default 989, the dense bf16 figure sold for H100/H200 SXM;
#                       set it for any other part: every MFU is relative to it; 0.1 in a dry run)
#   EXPECT              the dispatch the fallback check requires of every MoE layer on CUDA (default scatter)
#   COMPILE             `mhmoe bench train --compile` mode (default: the preset's, as `mhmoe train` runs it)
#   PACK                the gpu-9min token pack (default packs/gpu-9min; a dry run builds a smoke pack)
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,41p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg'; use --cpu-dry-run or nothing" >&2; exit 2 ;;
    esac
done

OUT="${OUT:-gpu_check_out}"
PY="${PYTHON:-python3}"
TOTAL_S=570
RESERVE_S=60  # kept for the summary and the packing
VARIANTS="dense,smoe,fine-grained,mhmoe-h2,mhmoe-h3"
# A dry run's MFU is plumbing only: a 0.1 TFLOP/s "peak" keeps its percentages readable on a CPU.
if [ "$DRY_RUN" = 1 ]; then PEAK="${MHMOE_PEAK_TFLOPS:-0.1}"; else PEAK="${MHMOE_PEAK_TFLOPS:-989}"; fi
if [ -e "$OUT/steps.tsv" ]; then
    echo "gpu_check.sh: $OUT already holds a check; set OUT to a new folder or remove it" >&2
    exit 2
fi
mkdir -p "$OUT/logs" "$OUT/profile" || exit 2
OUT="$(cd "$OUT" && pwd)"
LOGS="$OUT/logs"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Nothing outside the machine may be reachable: transformers' hub kernels must fail at once, not retry.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MHMOE_PEAK_TFLOPS="$PEAK"
COMPILE_ARGS=()
if [ -n "${COMPILE:-}" ]; then COMPILE_ARGS=(--compile "$COMPILE"); fi

if [ "$DRY_RUN" = 1 ]; then
    # Seconds allowed per step (ceilings for a loaded 2-core machine; 1-2 minutes in all on an idle one), then the
    # arguments that make each step small enough for a CPU. No peak-memory passes: MemTracker is slow on a CPU.
    T_TESTS=150; T_FALLBACK=120; T_LAYERS=120; T_TRAIN=240
    TESTS=(tests/unit/test_profiling.py tests/e2e/test_bench.py -k "attribution or order_statistic or median_ci")
    FALLBACK_ARGS=(--device cpu --preset smoke --dtype bfloat16 --dispatch grouped_mm --expect grouped_mm)
    LAYERS_ARGS=(--device cpu --dtypes float32 --tokens 64 --dim 96 --hidden-dim 256 --num-experts 4
                 --impls auto,grouped_mm,sorted --max-seconds 3 --no-memory)
    TRAIN_ARGS=(--device cpu --preset smoke --rounds 6 --no-memory)
    T_9MIN=120
    # The dry run reads a pack too: the smoke preset's, built from the corpus sample carried in the package.
    PACK="$OUT/work/pack"
    "$PY" -m mhmoe.cli data pack --preset smoke --data-root "$REPO/mhmoe/data/sample_data" --out "$PACK" \
        --cache-dir "$OUT/work/cache" > /dev/null || exit 2
    NINE_ARGS=(--preset smoke --set threads=1)
else
    T_TESTS=90; T_FALLBACK=75; T_LAYERS=80; T_TRAIN=300
    TESTS=(tests/unit/test_profiling.py tests/unit/test_compile.py tests/unit/test_experts.py
           tests/unit/test_sorted_experts.py tests/e2e/test_gpu_check.py tests/e2e/test_bench.py
           -k "not dry_run and not lognormal and not intra_op")
    for extra in tests/unit/test_scatter_experts.py; do  # the fused Triton experts' tests, once they exist
        if [ -e "$REPO/$extra" ]; then TESTS=("$extra" "${TESTS[@]}"); fi
    done
    if "$PY" -c "import xdist" 2>/dev/null; then TESTS+=(-n 8 --dist load); fi
    FALLBACK_ARGS=(--device cuda --preset gpu --expect "${EXPECT:-scatter}")
    # 16384 tokens keep an H100 busier than the CPU default of 4096.
    LAYERS_ARGS=(--device cuda --dtypes bfloat16 --tokens 16384 --impls auto,grouped_mm,sorted --max-seconds 25)
    TRAIN_ARGS=(--device cuda --preset gpu --rounds 20)
    T_9MIN=90
    PACK="${PACK:-$REPO/packs/gpu-9min}"
    NINE_ARGS=(--preset gpu-9min)
fi
T0=$(date +%s)

# limit NOMINAL: the step's limit, cut to what is left of TOTAL_S after RESERVE_S (and `timeout`'s 15 s grace).
limit() {
    local left=$(( TOTAL_S - RESERVE_S - 15 - ($(date +%s) - T0) ))
    if [ "$left" -lt "$1" ]; then echo $(( left > 5 ? left : 5 )); else echo "$1"; fi
}

# record NAME RC T0: one line of steps.tsv.
record() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$(( $(date +%s) - $3 ))" "logs/$1.log" >> "$OUT/steps.tsv"
    echo "   exit $2 after $(( $(date +%s) - $3 )) s"
}

# run_step NAME LIMIT_S CMD...: CMD's output in logs/NAME.log (stdout and stderr), its exit code and wall time in
# steps.tsv. SIGINT first, so that Python stops cleanly; SIGKILL 15 s later if it does not.
run_step() {
    local name="$1" lim="$2" t0
    shift 2
    t0=$(date +%s)
    echo "== $name (limit ${lim}s): $*"
    timeout --signal=INT --kill-after=15 "$lim" "$@" > "$LOGS/$name.log" 2>&1
    record "$name" $? "$t0"
}

# json_step NAME LIMIT_S CMD...: as run_step, the command's stdout (JSON) in logs/NAME.json, apart from its log.
json_step() {
    local name="$1" lim="$2" t0
    shift 2
    t0=$(date +%s)
    echo "== $name (limit ${lim}s): $*"
    timeout --signal=INT --kill-after=15 "$lim" "$@" > "$LOGS/$name.json" 2> "$LOGS/$name.log"
    record "$name" $? "$t0"
}

versions() {
    echo "date: $(date -Is)"
    echo "dry_run: $DRY_RUN"
    echo "peak_tflops: $PEAK"
    echo "expect: ${EXPECT:-scatter}"
    echo "compile: ${COMPILE:-preset}"
    echo "uname: $(uname -a)"
    echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    grep -m1 "model name" /proc/cpuinfo 2>/dev/null
    echo "cpus: $(nproc 2>/dev/null)"
    timeout 40 "$PY" -c 'import sys, torch
print("python:", sys.version.split()[0])
print("torch:", torch.__version__)
print("cuda:", torch.version.cuda)
print("cuda_available:", torch.cuda.is_available())
for name in ("triton", "transformers"):
    try:
        print(f"{name}:", __import__(name).__version__)
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__})")
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
    timeout 15 nvidia-smi || return $?
    timeout 15 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit,driver_version \
        --format=csv
}

printf 'step\texit_code\tseconds\tlog\n' > "$OUT/steps.tsv"
cd "$REPO" || exit 2
for fn in versions gpu_info; do
    t0=$(date +%s)
    echo "== $fn"
    "$fn" > "$LOGS/$fn.log" 2>&1
    record "$fn" $? "$t0"
done
run_step tests "$(limit "$T_TESTS")" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
run_step fallback "$(limit "$T_FALLBACK")" "$PY" benchmarks/gpu_fallback_check.py "${FALLBACK_ARGS[@]}" --variants "$VARIANTS" \
    --json "$LOGS/fallback.json"
json_step bench_layers "$(limit "$T_LAYERS")" "$PY" -m mhmoe.cli bench layers --json "${LAYERS_ARGS[@]}" --peak-tflops "$PEAK"
run_step gpu9min "$(limit "$T_9MIN")" "$PY" benchmarks/gpu_9min_check.py "${NINE_ARGS[@]}" --pack "$PACK" \
    --json "$LOGS/gpu9min.json"
json_step bench_train "$(limit "$T_TRAIN")" "$PY" -m mhmoe.cli bench train --json "${TRAIN_ARGS[@]}" --variants "$VARIANTS" \
    --max-seconds 0 --peak-tflops "$PEAK" --profile "$OUT/profile" --profile-variants smoe,mhmoe-h3 \
    --profile-steps 2 ${COMPILE_ARGS[@]+"${COMPILE_ARGS[@]}"}
run_step summary 30 "$PY" benchmarks/gpu_check_summary.py "$OUT"

echo "== steps"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
if [ -f "$OUT/summary.md" ]; then
    echo "== $OUT/summary.md"
    cat "$OUT/summary.md"
else
    # The summary script failed: steps.tsv is the summary.
    cp "$OUT/steps.tsv" "$OUT/summary.md"
fi
# The step logs into one archive, so that the folder holds a handful of files (the device tool returns 8).
if tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs; then rm -rf "$LOGS"; fi
rm -rf "$OUT/work"  # the dry run's pack and cache
echo "== $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
