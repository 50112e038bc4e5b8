"""A fixed-seed fingerprint of every recipe: a few steps each on the real data, and every
metrics.jsonl field except the wall-clock ones. A refactor that claims "no change in
behaviour" prints the same JSON before and after (compare with `diff`).

    CIFARLAB_DATA=../shared/cifar10 python scripts/behaviour_fingerprint.py > before.json
    ... refactor ...
    CIFARLAB_DATA=../shared/cifar10 python scripts/behaviour_fingerprint.py > after.json
    diff before.json after.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CLOCK = {"seconds"}  # wall-clock fields: differ from run to run by nature
COMMON = ["--max-steps", "4", "--eval-freq", "2", "--log-freq", "1", "--test-images", "100", "--seed", "3",
          "--precision", "fp32", "--no-progress"]  # fmt: skip
RUNS = {
    "mlp-numpy": ["mlp-numpy", "--preset", "best", "--warmup-steps", "2"],
    "mlp": ["mlp", "--preset", "best"],
    "mlp-layernorm": ["mlp", "--norm", "layer"],
    "convnet": ["convnet", "--preset", "best", "--batch-size", "16"],
    "efficientnet_lite0": [
        "efficientnet_lite0",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--freeze-stages",
        "2",
    ],
    "fast": ["fast", "--batch-size", "64"],
}


def main() -> None:
    out: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in RUNS.items():
            run = Path(tmp) / name
            cmd = [sys.executable, "-m", "cifarlab", "train", *argv, *COMMON, "--out", str(run)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{name}: {p.stderr.strip()}")
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            out[name] = [{k: v for k, v in r.items() if k not in CLOCK} for r in records]
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
