#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "GPU check"): on a bare CUDA machine, from the repo root,
# install what the machine lacks from carried wheels (.whl/), then, each part under its own time
# limit and all of them under DEADLINE seconds:
#   1. pytest -m gpu                        -> $OUT/gpu_tests.txt
#   2. attention fwd+bwd bench (bf16, 32 x 128, 8k..64k)   -> $OUT/attention.json
#   3. one LoRA+ training step of a ~1B Llama, SF-Attn vs full (16k, 32k) -> $OUT/train_step.json
#   4. KV-cache bench: hybrid vs full prefill and decode (32k, 64k)      -> $OUT/kv.json
# then $OUT/summary.md (the section `python -m finetune.gpu_section $OUT` writes into
# docs/benchmarks.md), $OUT/env.txt (versions), $OUT/status.txt (exit code and seconds per
# part), $OUT/log.txt (everything): 8 files. A part that fails or runs out of time is recorded
# and the next one runs (no `set -e`); the JSON files are rewritten as rows come in.
#
#   OUT=runs/gpu-check scripts/gpu_check.sh          # on a GPU machine (OUT defaults to that)
#   scripts/gpu_check.sh --smoke                     # tiny sizes on the CPU: tries every part
#
# Environment: PY (python, default python3), DEADLINE (seconds for all parts, default 480),
# WHEELS (folder of wheels to install into /tmp/site, default .whl; skipped in --smoke),
# PARTS (default "tests attention train_step kv": a rerun can name only the parts it needs).
set -u
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
PY=${PY:-python3}
OUT=${OUT:-runs/gpu-check}
DEADLINE=${DEADLINE:-480}
PARTS=" ${PARTS:-tests attention train_step kv} "
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
: >"$OUT/status.txt"
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false LONGTUNE_FLEX_COMPILE=1

log() { echo "[$(date -u +%H:%M:%S) +$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

# part NAME LIMIT CMD...: run CMD with its output in the log, killed after LIMIT seconds or at
# the deadline, whichever comes first; status.txt gets "NAME rc SECONDS".
part() {
    local name=$1 limit=$2 left rc t
    shift 2
    case "$PARTS" in *" $name "*) ;; *) return ;; esac
    left=$((DEADLINE - ($(date +%s) - T0)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        log "== $name: skipped (deadline)"
        echo "$name skipped 0" >>"$OUT/status.txt"
        return
    fi
    log "== $name (limit ${limit}s): $*"
    t=$(date +%s)
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && log "== $name: TIMED OUT after ${limit}s"
    echo "$name $rc $(($(date +%s) - t))" >>"$OUT/status.txt"
    log "== $name: exit $rc ($(($(date +%s) - t))s)"
}

# ---------------------------------------------------------------- setup
if [ "$SMOKE" = 0 ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    log "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl >>"$LOG" 2>&1 || log "wheel install FAILED (see log)"
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "mode: $([ "$SMOKE" = 1 ] && echo smoke || echo full)"
    echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    echo "cpus: $(nproc)"
    "$PY" - <<'EOF'
import importlib, sys
print(f"python: {sys.version.split()[0]}")
for name in ("torch", "triton", "transformers", "peft", "accelerate", "pydantic", "huggingface_hub",
             "tokenizers", "safetensors", "numpy", "flash_attn", "deepspeed", "finetune", "kernels"):
    try:
        m = importlib.import_module(name)
        where = getattr(m, "__file__", "") or ""
        print(f"{name}: {getattr(m, '__version__', 'present')}" + (f" ({where})" if name in ("finetune", "kernels") else ""))
    except Exception as e:  # noqa: BLE001
        print(f"{name}: absent ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
import torch
print(f"cuda: {torch.cuda.is_available()} {torch.version.cuda} "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device: running the smoke sizes instead"
    SMOKE=1
fi

# ---------------------------------------------------------------- parts
# 1. the gpu-marked tests (skipped without CUDA): -v, so a part cut short still shows each result;
# 4 pytest-xdist workers where installed (the time goes into compiling FlexAttention kernels)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && [ "$SMOKE" = 0 ] && XDIST=(-n 4)
part tests 80 "$PY" -m pytest -m gpu -v -rfE -p no:cacheprovider "${XDIST[@]}" tests/test_gpu.py \
    tests/test_backends.py tests/test_memory.py
case "$PARTS" in *" tests "*) sed -n '/test session starts/,$p' "$LOG" | grep -E "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS|passed|failed|error|skipped|deselected|^E " \
    | grep -v "^\[[0-9]" >"$OUT/gpu_tests.txt" ;; esac

if [ "$SMOKE" = 1 ]; then
    ATT=(--device cpu --lengths 256 512 --heads 4 --head-dim 32 --repeats 1)
    TRAIN=(--smoke --timeout 120)
    KV=(--device cpu --lengths 256 --batch 1 2 --layers 3 --hidden 64 --heads 4 --kv-heads 2 --window 32 --decode 4)
else
    # 32k first (the target), then 64k (FlexAttention recompiles once, for dynamic shapes), then 8k, 16k
    ATT=(--device cuda --lengths 32768 65536 8192 16384 --heads 32 --head-dim 128 --repeats 3)
    TRAIN=(--device cuda --lengths 16384 32768 --variants causal sf_attn:sdpa_groups sf_attn --timeout 75)
    # best of 2 runs per method: the first one compiles FlexAttention for the prefill's length
    KV=(--device cuda --dtype bfloat16 --layers 16 --hidden 2048 --heads 32 --kv-heads 8 --window 4096
        --lengths 32768 65536 --batch 1 8 --max-tokens 300000 --decode 32 --repeat 2)
fi
# 2. attention kernels
part attention 160 "$PY" -m kernels.bench "${ATT[@]}" --no-write --json "$OUT/attention.json"
# 3. one training step
part train_step 140 "$PY" -m finetune.train_step_bench "${TRAIN[@]}" --no-write --json "$OUT/train_step.json"
# 4. KV caches (hybrid vs full)
part kv 90 "$PY" -m finetune.caches.bench "${KV[@]}" --methods full hybrid --no-write --json "$OUT/kv.json"

# ---------------------------------------------------------------- summary
"$PY" -m finetune.gpu_section "$OUT" --output "$OUT/summary.md" >>"$LOG" 2>&1 || log "summary FAILED (see log)"
log "done in $(($(date +%s) - T0))s; status (part exit seconds):"
cat "$OUT/status.txt"
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
exit 0
