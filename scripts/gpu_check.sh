#!/usr/bin/env bash
# The GPU check of docs/distributed.md: the ConvNet seed protocol and the EfficientNet-Lite0
# fine-tune end to end on CUDA, plus one short torchrun (nccl) job when the machine has two
# or more GPUs. Run from the repository root on a machine with an NVIDIA GPU:
#
#   CIFARLAB_DATA=/path/to/cifar10 OUT=gpu-results bash scripts/gpu_check.sh
#
# It installs the project into a fresh venv with the default (CUDA) torch wheel unless
# CIFARLAB_PYTHON names a Python that already has cifarlab and a CUDA torch. Each run
# directory (config.json, metrics.jsonl, summary.json, curves.png) is copied to $OUT, and
# $OUT/gpu_check.md gets one table row per run, ready for docs/benchmarks.md.
set -euo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PY=${CIFARLAB_PYTHON:-}
if [ -z "$PY" ]; then
  python3 -m venv "$OUT/venv"
  "$OUT/venv/bin/pip" install -q torch
  "$OUT/venv/bin/pip" install -q -e ".[pretrained]"
  PY="$OUT/venv/bin/python"
fi
"$PY" - <<'EOF' | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i), "bf16:", torch.cuda.is_bf16_supported())
EOF

run() {  # name, then cifarlab train arguments
  local name=$1; shift
  rm -rf "$OUT/runs/$name"
  /usr/bin/time -f "%e s wall" "$PY" -m cifarlab train "$@" --device cuda --no-progress --out "$OUT/runs/$name" 2>&1 | tail -3
  rm -rf "$OUT/runs/$name/checkpoint"  # no weights in the results
}

run convnet-seed convnet --preset seed
run convnet-seed-fp32 convnet --preset seed --precision fp32
run efficientnet-finetune efficientnet_lite0 --preset finetune
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  rm -rf "$OUT/runs/convnet-seed-ddp2"
  "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m cifarlab train convnet --preset seed \
    --device cuda --no-progress --out "$OUT/runs/convnet-seed-ddp2" 2>&1 | tail -3
  rm -rf "$OUT/runs/convnet-seed-ddp2/checkpoint"
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["| run | device | precision | world | test accuracy | wall s | train img/s | eval img/s |",
        "|---|---|---|---:|---:|---:|---:|---:|"]
for run in sorted((out / "runs").iterdir()):
    if not (run / "summary.json").is_file():
        rows.append(f"| {run.name} | failed: see its output | | | | | | |")
        continue
    s, c = json.loads((run / "summary.json").read_text()), json.loads((run / "config.json").read_text())
    d = c["distributed"]
    rows.append(f"| {run.name} | {d['device']} | {d['precision']} | {d['world_size']} | {s['test_accuracy']:.4f} "
                f"| {s['wall_seconds']:.0f} | {s['images_per_second']:.0f} | {s['eval_images_per_second']:.0f} |")
(out / "gpu_check.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
