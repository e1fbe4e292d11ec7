#!/usr/bin/env bash
# The GPU check: one prepared run for one CUDA GPU (H100/H200 class) that fits in one 10-minute call.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same plumbing on CPU at toy sizes (about 45 s on 2 cores, 2026-12-08)
#
# Steps, each under its own `timeout` and run whatever the previous one returned. The whole check ends within
# TOTAL_S = 570 s: a step's limit is its planned seconds cut to what is left of TOTAL_S (less 60 s kept for the
# summary and the packing), so the worst case is 570 s. The figures that matter most come first, and every step
# that measures writes its JSON as it goes (`--json-out`, gpu_9min_check.py after each run): a step cut off keeps
# what it finished. Plan on an H100/H200, planned limit / expected:
#   1. versions        40 s /  ~10 s  python, torch, CUDA, triton, transformers, the GPU;
#   2. gpu_info        30 s /   ~3 s  nvidia-smi and a CSV of clocks, power limit, driver;
#   3. bench_layers   100 s /  ~70 s  `mhmoe bench layers` at d=768, 16384 tokens, bf16: every layer on what
#                                     dispatch="auto" picks on CUDA, plus grouped_mm and sorted, and transformers'
#                                     Mixtral blocks; 25 s of shuffled rounds; MFU against $MHMOE_PEAK_TFLOPS
#                                     (the first step to run the scatter kernels: their bf16 builds compile here);
#   4. bench_train    110 s /  ~60 s  `mhmoe bench train --compile off` of the five variants at the gpu preset
#                                     (d=384, 12 layers, 64 x 1024-token micro-batches, 2 per step, vocab 50,304),
#                                     each step as `mhmoe train` runs it (AdamW, bf16 autocast) but eager, on random
#                                     tokens: each model alone, then 20 timed steps each in shuffled rounds
#                                     (tokens/s, MFU, x SMoE with 95% intervals), then a profile of 2 steps of smoe
#                                     and mhmoe-h3;
#   5. fallback        60 s /  ~30 s  benchmarks/gpu_fallback_check.py: the five Table 1 models at the gpu preset
#                                     on CUDA: every MoE layer on the dispatch $EXPECT (default scatter), 0 graph
#                                     breaks in the compiled training forward; exit 1 otherwise;
#   6. gpu9min         90 s /  ~60 s  benchmarks/gpu_9min_check.py: one seed of smoe and mhmoe-h3 of the gpu-9min
#                                     preset, trained and evaluated as `mhmoe reproduce` does, from its token pack
#                                     ($PACK, default packs/gpu-9min: build it with `mhmoe data pack --preset
#                                     gpu-9min --data-root DIR --out packs/gpu-9min` and carry it): the measured
#                                     time per run and the 15-run matrix extrapolated from it;
#   7. tests           90 s /  ~60 s  a targeted subset (TESTS below): the bf16 scatter-kernel tests in one xdist
#                                     worker (they compile; one config per kernel), their configs, the chunked
#                                     loss on CUDA, profiling and its labels under compile, compile without graph
#                                     breaks, the experts' dispatches, the bench and this check's summary;
#   8. bench_train_compiled           the rest of the budget (at most 300 s): `mhmoe bench train` with the preset's
#                     rest / all      compile mode (or $COMPILE), the models in the order smoe, mhmoe-h3, dense,
#                                     fine-grained, mhmoe-h2, each compiled and timed alone before the next is
#                                     built, then (if all five were) the shuffled rounds; a time limit here is
#                                     planned: the summary reports the models it reached;
#   9. summary         30 s /   ~3 s  summary.md and summary.json: what finished, the budget of every step
#                                     (planned, limit, used), the acceptance lines;
#   then the step logs are packed into logs.tar.gz.
# Outputs, all in $OUT (at most 8 files, none deeper than one folder, none near 16 MiB):
#   steps.tsv (step, exit code, planned, limit and used seconds, log), summary.md, summary.json, logs.tar.gz (every
#   step's log and JSON: logs/<step>.log, logs/bench_layers.json, logs/bench_train.json,
#   logs/bench_train_compiled.json, logs/fallback.json, logs/gpu9min.json), profile/profile.md,
#   profile/profile.json, profile/trace.json (trace.json.gz when larger than 12 MiB).
#
# Environment:
#   OUT                 output folder (default gpu_check_out); must not hold an earlier check
#   PYTHON              interpreter with torch (default python3); the repository is put first on PYTHONPATH
#   MHMOE_PEAK_TFLOPS   the GPU's peak for bf16 (default 989, the dense bf16 figure sold for H100/H200 SXM;
#                       set it for any other part: every MFU is relative to it; 0.1 in a dry run)
#   EXPECT              the dispatch the fallback check requires of every MoE layer on CUDA (default scatter)
#   COMPILE             `mhmoe bench train --compile` mode of bench_train_compiled (default: the preset's, as
#                       `mhmoe train` runs it)
#   PACK                the gpu-9min token pack (default packs/gpu-9min; a dry run builds a smoke pack)
set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,58p' "${BASH_SOURCE[0]}"; exit 0 ;;
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

if [ "$DRY_RUN" = 1 ]; then
    # Seconds planned per step (ceilings for a loaded 2-core machine, which took 99 s in all on 2026-12-07), then
    # the arguments that make each step small enough for a CPU. No peak-memory passes: MemTracker is slow on a CPU.
    T_LAYERS=120; T_TRAIN=150; T_FALLBACK=120; T_9MIN=120; T_TESTS=150; T_COMPILED=150
    LAYERS_ARGS=(--device cpu --dtypes float32 --tokens 64 --dim 96 --hidden-dim 256 --num-experts 4
                 --impls auto,grouped_mm,sorted --max-seconds 1 --no-memory)
    TRAIN_ARGS=(--device cpu --preset smoke --rounds 6 --no-memory)
    # Inductor's C++ takes about a minute per model on a CPU; aot_eager traces the same graph without generating
    # code. One model shows the plumbing.
    COMPILED_ARGS=(--device cpu --preset smoke --rounds 2 --no-memory --variants dense --compile on
                   --compile-backend aot_eager)
    # Two models show the plumbing (and both kinds of line): dense has no MoE layer, h=3 routes sub-tokens.
    FALLBACK_ARGS=(--device cpu --preset smoke --dtype bfloat16 --dispatch grouped_mm --expect grouped_mm
                   --variants dense,mhmoe-h3)
    # The step's plumbing (pytest runs, its last line is read): the summary's own tests, which import little.
    TESTS=(tests/e2e/test_gpu_check.py -k "partial_folder or acceptance_of_the_layer_table or writes_after_each_run")
    # The dry run reads a pack too: the smoke preset's, built from the corpus sample carried in the package.
    PACK="$OUT/work/pack"
    "$PY" -m mhmoe.cli data pack --preset smoke --data-root "$REPO/mhmoe/data/sample_data" --out "$PACK" \
        --cache-dir "$OUT/work/cache" > /dev/null || exit 2
    NINE_ARGS=(--preset smoke --set threads=1)
else
    T_LAYERS=100; T_TRAIN=110; T_FALLBACK=60; T_9MIN=90; T_TESTS=90; T_COMPILED=300
    # 16384 tokens keep an H100 busier than the CPU default of 4096.
    LAYERS_ARGS=(--device cuda --dtypes bfloat16 --tokens 16384 --impls auto,grouped_mm,sorted --max-seconds 25)
    TRAIN_ARGS=(--device cuda --preset gpu --rounds 20)
    # The models the acceptance compares first: a time limit leaves h=3 and SMoE measured.
    COMPILED_ARGS=(--device cuda --preset gpu --rounds 20 --variants smoe,mhmoe-h3,dense,fine-grained,mhmoe-h2
                   --compile "${COMPILE:-preset}")
    FALLBACK_ARGS=(--device cuda --preset gpu --expect "${EXPECT:-scatter}" --variants "$VARIANTS")
    # The scatter-kernel tests in bf16 (what dispatch="auto" runs on CUDA; fp32's are the CPU suite's) and in one
    # xdist worker (--dist loadgroup, xdist_group "triton-kernels"): each kernel variant compiles once.
    TESTS=(tests/unit/test_scatter_configs.py tests/unit/test_loss.py tests/unit/test_profiling.py
           tests/unit/test_compile.py tests/unit/test_experts.py tests/unit/test_sorted_experts.py
           tests/e2e/test_gpu_check.py tests/e2e/test_bench.py
           -k "not dry_run and not lognormal and not intra_op and not fp32")
    for extra in tests/unit/test_scatter_experts.py; do
        if [ -e "$REPO/$extra" ]; then TESTS=("$extra" "${TESTS[@]}"); fi
    done
    if "$PY" -c "import xdist" 2>/dev/null; then TESTS+=(-n 8 --dist loadgroup); fi
    PACK="${PACK:-$REPO/packs/gpu-9min}"
    NINE_ARGS=(--preset gpu-9min)
fi
T0=$(date +%s)

# limit PLANNED: the step's planned seconds, cut to what is left of TOTAL_S after RESERVE_S (and `timeout`'s
# 15 s grace).
limit() {
    local left=$(( TOTAL_S - RESERVE_S - 15 - ($(date +%s) - T0) ))
    if [ "$left" -lt "$1" ]; then echo $(( left > 5 ? left : 5 )); else echo "$1"; fi
}

# record NAME RC PLANNED LIMIT T0: one line of steps.tsv (planned against used seconds).
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(( $(date +%s) - $5 ))" "logs/$1.log" >> "$OUT/steps.tsv"
    echo "   exit $2 after $(( $(date +%s) - $5 )) s (planned $3 s, limit $4 s)"
}

# run_step NAME PLANNED_S CMD...: CMD under `timeout` at limit(PLANNED_S); its output (stdout and stderr) in
# logs/NAME.log, its exit code and seconds in steps.tsv. SIGINT first, so that Python stops cleanly; SIGKILL 15 s
# later if it does not. The JSON of a measuring step goes to its own file (--json-out / --json), never stdout.
run_step() {
    local name="$1" planned="$2" lim t0
    shift 2
    lim="$(limit "$planned")"
    t0=$(date +%s)
    echo "== $name (planned ${planned}s, limit ${lim}s): $*"
    timeout --signal=INT --kill-after=15 "$lim" "$@" > "$LOGS/$name.log" 2>&1
    record "$name" $? "$planned" "$lim" "$t0"
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

printf 'step\texit_code\tplanned_s\tlimit_s\tused_s\tlog\n' > "$OUT/steps.tsv"
cd "$REPO" || exit 2
for fn in versions:40 gpu_info:30; do  # their own timeouts inside
    t0=$(date +%s)
    echo "== ${fn%%:*}"
    "${fn%%:*}" > "$LOGS/${fn%%:*}.log" 2>&1
    record "${fn%%:*}" $? "${fn##*:}" "${fn##*:}" "$t0"
done
# The figures that matter most first: the layer table, then every model's eager tokens/s and MFU (and the profile).
run_step bench_layers "$T_LAYERS" "$PY" -m mhmoe.cli bench layers "${LAYERS_ARGS[@]}" --peak-tflops "$PEAK" \
    --json-out "$LOGS/bench_layers.json"
run_step bench_train "$T_TRAIN" "$PY" -m mhmoe.cli bench train "${TRAIN_ARGS[@]}" --variants "$VARIANTS" \
    --compile off --max-seconds 0 --peak-tflops "$PEAK" --profile "$OUT/profile" --profile-variants smoe,mhmoe-h3 \
    --profile-steps 2 --json-out "$LOGS/bench_train.json"
run_step fallback "$T_FALLBACK" "$PY" benchmarks/gpu_fallback_check.py "${FALLBACK_ARGS[@]}" --json "$LOGS/fallback.json"
run_step gpu9min "$T_9MIN" "$PY" benchmarks/gpu_9min_check.py "${NINE_ARGS[@]}" --pack "$PACK" \
    --json "$LOGS/gpu9min.json"
run_step tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
# Compiled models for as long as the budget allows: each is written as soon as it is timed.
run_step bench_train_compiled "$T_COMPILED" "$PY" -m mhmoe.cli bench train "${COMPILED_ARGS[@]}" --max-seconds 0 \
    --peak-tflops "$PEAK" --json-out "$LOGS/bench_train_compiled.json"
# The summary's limit is its own (RESERVE_S keeps time for it), not cut.
t0=$(date +%s)
echo "== summary (planned 30s, limit 30s)"
timeout --signal=INT --kill-after=5 30 "$PY" benchmarks/gpu_check_summary.py "$OUT" > "$LOGS/summary.log" 2>&1
record summary $? 30 30 "$t0"

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
