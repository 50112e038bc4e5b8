"""``cifarlab eval`` and ``cifarlab predict``: use a trained checkpoint.

A checkpoint (``<run>/checkpoint/model.safetensors``) carries its model name, the model's
arguments and the preprocessing statistics, so nothing else is needed to rebuild it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cifarlab.data import CLASSES, Preprocess, load_cifar10
from cifarlab.errors import UsageError
from cifarlab.runs import atomic_write_json


def load_classifier(path: str | Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """A function uint8 NHWC images -> logits (N, 10), and the checkpoint's metadata.

    Works for every torch model of ``create_model`` and for the NumPy MLP.
    """
    from cifarlab.train import find_checkpoint, load_weights

    ckpt = find_checkpoint(Path(path))
    weights, meta, prep = load_weights(ckpt)
    if meta.get("model") == "mlp-numpy":
        return _numpy_classifier(weights, meta, prep), meta
    import torch

    from cifarlab.models import create_model
    from cifarlab.train import to_tensor

    try:
        kwargs = dict(meta.get("model_kwargs", {}))
        if "pretrained" in kwargs:  # the checkpoint has all the weights: no ImageNet download/load
            kwargs["pretrained"] = False
        model = create_model(meta["model"], **kwargs)
        model.load_state_dict(weights)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UsageError(f"{ckpt}: checkpoint does not match its model ({e})") from None
    model.eval()

    @torch.inference_mode()
    def logits(x: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [model(to_tensor(x[i : i + 1000], prep, False)).numpy() for i in range(0, len(x), 1000)]
        )

    return logits, meta


def _numpy_classifier(weights: dict, meta: dict, prep: Preprocess) -> Callable[[np.ndarray], np.ndarray]:
    from cifarlab.numpy_nn.mlp import MLP
    from cifarlab.numpy_nn.train import features

    model = MLP(3072, meta["n_hidden"], 10, activation=meta["activation"])
    model.load_state_dict({k: v.numpy() for k, v in weights.items()})
    return lambda x: model.logits(features(x, prep, model.dtype))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def eval_main(args: argparse.Namespace) -> int:
    from cifarlab.plots import plot_confusion

    target = Path(args.target)
    if not target.exists():
        raise UsageError(f"{target} does not exist (give a run directory or a checkpoint)")
    logits_fn, meta = load_classifier(target)
    _, _, x_test, y_test = load_cifar10(args.data_dir, verify=args.verify)
    pred = logits_fn(x_test).argmax(1)
    cm = np.zeros((10, 10), dtype=np.int64)
    np.add.at(cm, (y_test, pred), 1)
    per_class = cm.diagonal() / cm.sum(1)
    acc = float((pred == y_test).mean())
    out = Path(args.out) if args.out else (target if target.is_dir() else target.parent)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_confusion(cm, CLASSES, out / "confusion.png", f"{meta.get('model')}: test accuracy {acc:.4f}")
    atomic_write_json(
        out / "eval.json",
        {
            "test_accuracy": acc,
            "per_class_accuracy": dict(zip(CLASSES, per_class.tolist())),
            "confusion": cm.tolist(),
        },
    )
    print(f"test accuracy {acc:.4f} on {len(y_test)} images ({meta.get('model')})")
    for c, a in zip(CLASSES, per_class):
        print(f"  {c:12s} {a:.3f}")
    print(f"confusion matrix: {png}")
    return 0


def read_images(paths: list[str]) -> np.ndarray:
    """Any image file -> uint8 (N, 32, 32, 3): converted to RGB, resized to 32x32."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
                out.append(np.asarray(im, dtype=np.uint8))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            reason = "not a readable image" if isinstance(e, UnidentifiedImageError) else str(e)
            raise UsageError(f"{p}: cannot read image ({reason})") from None
    return np.stack(out)


def predict_main(args: argparse.Namespace) -> int:
    images = read_images(args.images)  # every file is checked before anything is printed
    logits_fn, _ = load_classifier(args.checkpoint)
    probs = softmax(logits_fn(images).astype(np.float64))
    for path, p in zip(args.images, probs):
        top = np.argsort(-p)[:3]
        print(f"{path}: " + ", ".join(f"{CLASSES[k]} {p[k]:.3f}" for k in top))
    if args.json:
        print(
            json.dumps(
                {
                    path: {CLASSES[k]: float(p[k]) for k in np.argsort(-p)[:3]}
                    for path, p in zip(args.images, probs)
                }
            )
        )
    return 0


def main(args: argparse.Namespace) -> int:
    return eval_main(args) if args.command == "eval" else predict_main(args)
