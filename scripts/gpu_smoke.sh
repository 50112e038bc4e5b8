#!/usr/bin/env bash
# A short check that every command path works on a GPU, with no dataset to carry: a synthetic
# CIFAR-10 in the official binary layout (6,000 images whose class sets their brightness, so a
# model that learns beats chance), read with --no-verify. Each recipe trains a few steps on the
# device in its own precision, one run is interrupted and resumed, one is evaluated with
# `cifarlab eval`, one runs under torchrun (nccl), and a two-run sweep goes through the study
# layer. Prints one line per check and ends with "ALL OK" or the failures.
#
#   bash scripts/gpu_smoke.sh                 # on a machine with an NVIDIA GPU
#   DEVICE=cpu bash scripts/gpu_smoke.sh      # the same checks on the CPU (a dry run)
set -uo pipefail
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d)}
PY=${CIFARLAB_PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
D=$OUT/data
mkdir -p "$D/cifar-10-batches-bin"
"$PY" - "$D/cifar-10-batches-bin" <<'EOF'
import sys
from pathlib import Path
import numpy as np
out, rng = Path(sys.argv[1]), np.random.default_rng(0)
def batch(n):
    y = rng.integers(0, 10, n, dtype=np.uint8)
    x = np.clip(y[:, None] * 22 + rng.normal(20, 25, (n, 3072)), 0, 255).astype(np.uint8)
    return np.concatenate([y[:, None], x], 1).tobytes()
for i in range(1, 6):
    (out / f"data_batch_{i}.bin").write_bytes(batch(1000))
(out / "test_batch.bin").write_bytes(batch(1000))
(out / "batches.meta.txt").write_text("\n".join("airplane automobile bird cat deer dog frog horse ship truck".split()) + "\n")
EOF
"$PY" -c "import torch; print('torch', torch.__version__, 'device', '$DEVICE', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
COMMON=(--data-dir "$D" --no-verify --no-progress --device "$DEVICE")
FAILED=()
check() {  # name, then a command; its last output line is shown
  local name=$1; shift
  local log="$OUT/$name.log"
  if "$@" >"$log" 2>&1; then
    echo "ok    $name: $(tail -n 1 "$log" | cut -c1-150)"
  else
    echo "FAIL  $name: $(tail -n 2 "$log" | tr '\n' ' ' | cut -c1-300)"
    FAILED+=("$name")
  fi
}
acc() { "$PY" -c "import json,sys; s=json.load(open(sys.argv[1]+'/summary.json')); print('test_accuracy', s['test_accuracy'], 'resumed', s.get('resumed'))" "$1"; }
train() { "$PY" -m cifarlab train "$@" "${COMMON[@]}"; }

check mlp-bf16 train mlp --preset best --max-steps 60 --eval-freq 30 --batch-size 100 --precision bf16 --out "$OUT/mlp-bf16"
check mlp-bf16-learns "$PY" -c "import json,sys; a=json.load(open('$OUT/mlp-bf16/summary.json'))['test_accuracy']; print('test_accuracy', a); sys.exit(a < 0.3)"
check mlp-numpy "$PY" -m cifarlab train mlp-numpy --max-steps 60 --eval-freq 30 --data-dir "$D" --no-verify \
  --no-progress --out "$OUT/mlp-numpy"
check convnet-fp32-30 train convnet --preset seed --max-steps 30 --eval-freq 15 --precision fp32 --out "$OUT/convnet"
check convnet-resume-60 train convnet --resume "$OUT/convnet" --max-steps 60
check convnet-resumed acc "$OUT/convnet"
check fast-auto train fast --max-steps 12 --eval-freq 6 --batch-size 256 --out "$OUT/fast"
check fast-precision "$PY" -c "import json; c=json.load(open('$OUT/fast/config.json')); print('resolved precision', c['distributed']['precision'], 'on', c['distributed']['device'])"
check efficientnet-scratch train efficientnet_lite0 --preset scratch --max-steps 6 --eval-freq 6 --batch-size 32 --image-size 32 --out "$OUT/eff"
check eval "$PY" -m cifarlab eval "$OUT/mlp-bf16" --data-dir "$D" --no-verify --device "$DEVICE"
check torchrun "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m cifarlab train mlp --max-steps 20 \
  --eval-freq 20 "${COMMON[@]}" --out "$OUT/ddp1"
check sweep-seeds "$PY" -m cifarlab sweep seeds mlp --seeds 2 --max-steps 20 --jobs 2 --data-dir "$D" --no-verify \
  --no-progress --device "$DEVICE" --out-root "$OUT/sweep" --out "$OUT/sweep"
check runs-table "$PY" -m cifarlab runs "$OUT"
if [ ${#FAILED[@]} -eq 0 ]; then echo "ALL OK ($OUT)"; else echo "FAILED: ${FAILED[*]} (logs in $OUT)"; exit 1; fi
