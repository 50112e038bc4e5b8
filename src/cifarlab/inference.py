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

from cifarlab.data import CLASSES, load_cifar10
from cifarlab.errors import CheckpointError, UsageError, reason
from cifarlab.runs import atomic_write_json, check_writable_dir


def load_classifier(
    path: str | Path, device: str = "auto"
) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """A function uint8 NHWC images -> logits (N, 10), and the checkpoint's metadata.

    The same path for every registered model, torch or NumPy; a NumPy checkpoint never
    imports torch (and runs on the CPU); a torch model runs on ``device``.
    """
    from cifarlab.checkpoints import build_model, load
    from cifarlab.registry import get_model_entry

    ckpt = load(path)
    model = build_model(ckpt)
    meta = {"model": ckpt.model, "model_kwargs": ckpt.model_kwargs, "checkpoint": str(ckpt.path)}
    prep = ckpt.preprocess
    if get_model_entry(ckpt.model).framework == "numpy":
        from cifarlab.numpy_nn.train import features

        if device not in ("auto", "cpu"):
            raise UsageError(f"--device {device}: {ckpt.model} is a NumPy model; it runs on the CPU")

        def logits(x: np.ndarray) -> np.ndarray:
            return model.logits(features(x, prep, model.dtype))
    else:
        from cifarlab.devices import resolve_device
        from cifarlab.train import logits_in_batches

        dev = resolve_device(device)
        model.to(dev)

        def logits(x: np.ndarray) -> np.ndarray:
            return logits_in_batches(model, x, prep, 500, device=dev).numpy()

    try:  # a checkpoint whose arguments build a model of another shape fails here, not later
        shape = logits(np.zeros((2, 32, 32, 3), np.uint8)).shape
    except Exception as e:
        raise CheckpointError(f"{ckpt.path}: its model does not run on 32x32 images ({reason(e)})") from None
    if shape != (2, len(CLASSES)):
        raise CheckpointError(
            f"{ckpt.path}: its model gives outputs of shape {shape[1:]}, not the {len(CLASSES)} CIFAR-10 classes"
        )
    return logits, meta


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _report_folder(target: Path) -> Path:
    """Where eval writes by default: the run directory (never inside checkpoint/, which the
    next save replaces), else the folder of the file named."""
    folder = target if target.is_dir() else target.parent
    return folder.parent if folder.name in ("checkpoint", "checkpoint.old") else folder


def eval_main(args: argparse.Namespace) -> int:
    from cifarlab.plots import plot_confusion

    target = Path(args.target)
    out = Path(args.out) if args.out else _report_folder(target)
    check_writable_dir(out, "--out")
    logits_fn, meta = load_classifier(target, args.device)
    _, _, x_test, y_test = load_cifar10(args.data_dir, verify=args.verify)
    pred = logits_fn(x_test).argmax(1)
    cm = np.zeros((10, 10), dtype=np.int64)
    np.add.at(cm, (y_test, pred), 1)
    per_class = cm.diagonal() / cm.sum(1)
    acc = float((pred == y_test).mean())
    out.mkdir(parents=True, exist_ok=True)
    png = plot_confusion(cm, CLASSES, out / "confusion.png", f"{meta.get('model')}: test accuracy {acc:.4f}")
    atomic_write_json(
        out / "eval.json",
        {
            "test_accuracy": acc,
            "checkpoint": meta["checkpoint"],
            "per_class_accuracy": dict(zip(CLASSES, per_class.tolist())),
            "confusion": cm.tolist(),
        },
    )
    print(f"test accuracy {acc:.4f} on {len(y_test)} images ({meta.get('model')})")
    for c, a in zip(CLASSES, per_class):
        print(f"  {c:12s} {a:.3f}")
    print(f"confusion matrix: {png}")
    return 0


MAX_IMAGE_PIXELS = 50_000_000  # a larger image is refused before it is decoded (decompression bombs)


def read_images(paths: list[str]) -> np.ndarray:
    """Any image file -> uint8 (N, 32, 32, 3): converted to RGB, resized to 32x32."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise UsageError(f"{p}: no such image file")
        try:
            with warnings.catch_warnings(), Image.open(p) as im:
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise UsageError(
                        f"{p}: {im.width}x{im.height} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit "
                        "(a decompression bomb?); resize it first"
                    )
                im = im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
                out.append(np.asarray(im, dtype=np.uint8))
        except UsageError:
            raise
        except UnidentifiedImageError:
            raise UsageError(f"{p}: cannot read image (not a readable image)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise UsageError(f"{p}: refused as a decompression bomb ({e})") from None
        except Exception as e:  # truncated or malformed files raise OSError, SyntaxError, ValueError...
            raise UsageError(f"{p}: cannot read image ({type(e).__name__}: {e})") from None
    return np.stack(out)


def predict_main(args: argparse.Namespace) -> int:
    images = read_images(args.images)  # every file is checked before anything is printed
    logits_fn, _ = load_classifier(args.checkpoint, args.device)
    probs = softmax(logits_fn(images).astype(np.float64))
    if not args.json:
        for path, p in zip(args.images, probs):
            top = np.argsort(-p)[:3]
            print(f"{path}: " + ", ".join(f"{CLASSES[k]} {p[k]:.3f}" for k in top))
    else:
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
