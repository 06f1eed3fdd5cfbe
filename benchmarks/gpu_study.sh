#!/usr/bin/env bash
# The GPU study of docs/RESULTS_LORA.md in one command: every pair named (default: the two trained
# LoRA pairs and the known-answer ladder) through `mechdiff run` with docs/lora_study/gpu.toml on one
# GPU in bfloat16, then `mechdiff compare` over all of them. Prints one line per pair (wall time and
# peak GPU memory), a time stamp on every stage's log line and each stage's own peak GPU memory.
#   benchmarks/gpu_study.sh OUT [PAIR ...]
set -euo pipefail
OUT=${1:?usage: gpu_study.sh OUT [PAIR ...]}; shift
PAIRS=("$@")
[ ${#PAIRS[@]} -gt 0 ] || PAIRS=(smollm2-culture-lora smollm2-math-lora smollm2-culture-l20-r1 smollm2-culture-l20-r2
                                 smollm2-culture-l20-r4 smollm2-culture-l20-r8 smollm2-math-attn-4)
CONFIG=${CONFIG:-docs/lora_study/gpu.toml}
PY=${PY:-python3}
mkdir -p "$OUT"
for p in "${PAIRS[@]}"; do
  if ! "$PY" - "$p" "$OUT/$p" "$CONFIG" <<'PYEOF'
import sys, time, torch
from mechdiff.experiments.study import run_study
pair, out, cfg = sys.argv[1:4]
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
peak = 0.0
def log(m):
    global peak
    if " done in " in m:            # a stage finished: its own peak, then reset for the next one
        p = torch.cuda.max_memory_allocated() / 2**30
        peak = max(peak, p)
        m += f" (peak GPU memory {p:.2f} GiB)"
        torch.cuda.reset_peak_memory_stats()
    print(f"[{pair} {time.perf_counter() - t0:7.1f} s] {m}", flush=True)
run_study(pair, cfg, out=out, device="cuda", dtype="bfloat16", log=log)
peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
print(f"study {pair}: {time.perf_counter() - t0:.1f} s wall, peak GPU memory {peak:.2f} GiB", flush=True)
PYEOF
  then echo "study $p failed (see above); the other pairs go on"; fi
done
dirs=(); for p in "${PAIRS[@]}"; do dirs+=("$OUT/$p"); done
"$PY" -m mechdiff.cli compare "${dirs[@]}" --out "$OUT/compare"
