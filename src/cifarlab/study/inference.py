"""``cifarlab eval`` and ``cifarlab predict``: use a trained checkpoint.

A checkpoint (``<run>/checkpoint/model.safetensors``) carries its model name, the model's
arguments and the preprocessing statistics, so nothing else is needed to rebuild it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.data import CLASSES, confusion_matrix, load_cifar10
from cifarlab.errors import CheckpointError, UsageError, json_safe, reason
from cifarlab.files import atomic_write_json, check_writable_dir
from cifarlab.training.runs import CHECKPOINT_DIRS, CONFIG_FILE


def load_classifier(
    path: str | Path, device: str = "auto", precision: str = "fp32"
) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """A function uint8 NHWC images -> logits (N, 10), and the checkpoint's metadata.

    The same path for every registered model, torch or NumPy; a NumPy checkpoint never
    imports torch (and runs on the CPU); a torch model runs on ``device``.
    """
    from cifarlab.registry import get_model_entry
    from cifarlab.training.checkpoints import build_model, load

    ckpt = load(path)
    model = build_model(ckpt)
    meta = {"model": ckpt.model, "model_kwargs": ckpt.model_kwargs, "checkpoint": str(ckpt.path)}
    prep = ckpt.preprocess
    if get_model_entry(ckpt.model).framework == "numpy":
        from cifarlab.numpy_nn.train import features

        if device not in ("auto", "cpu"):
            raise UsageError(f"--device {device}: {ckpt.model} is a NumPy model; it runs on the CPU")
        if precision != "fp32":
            raise UsageError(f"--precision {precision}: {ckpt.model} is a NumPy model; it has no autocast")

        def logits(x: np.ndarray) -> np.ndarray:
            return model.logits(features(x, prep, model.dtype))
    else:
        from cifarlab.training.devices import resolve_device, resolve_precision
        from cifarlab.training.torch_learner import logits_in_batches

        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        model.to(dev)
        meta["precision"] = prec

        def logits(x: np.ndarray) -> np.ndarray:
            return logits_in_batches(model, x, prep, 500, device=dev, precision=prec).numpy()

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
    return folder.parent if folder.name in CHECKPOINT_DIRS else folder


def _run_of(target: Path) -> Path | None:
    """The run directory ``target`` is (or whose checkpoint folder it is), if it has a config.json."""
    folder = target if target.is_dir() else None
    if folder is not None and folder.name in CHECKPOINT_DIRS:
        folder = folder.parent
    return folder if folder is not None and (folder / CONFIG_FILE).is_file() else None


def evaluate_run(
    run_dir: Path, device: str, precision: str | None, data_dir: str | None, verify: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's final test evaluation made again from its checkpoint: the same learner
    evaluation as training's (``Learner.evaluate``: same test images, evaluation batches,
    test-time augmentation and precision as config.json records), so the accuracy equals the
    summary's. ``precision`` overrides the recorded one. Returns (evaluation, what was used)."""
    from cifarlab.training.checkpoints import build_model, load
    from cifarlab.training.recipes import RECIPES
    from cifarlab.training.runs import RunDir
    from cifarlab.training.train_command import saved_config

    run = RunDir.open(run_dir)
    saved = run.read_config()
    recipe = RECIPES.get(saved.get("model", ""))
    if recipe is None:
        raise CheckpointError(f"{run.config_path}: unknown model {saved.get('model')!r}")
    cfg = saved_config(recipe, run)
    ckpt = load(run.checkpoint_dir)
    if ckpt.model != recipe.name:
        raise CheckpointError(
            f"{run.checkpoint_dir} holds {ckpt.model}, but {run.config_path} says {recipe.name}"
        )
    model = build_model(ckpt)
    recorded = (saved.get("distributed") or {}).get("precision")
    if recipe.framework == "numpy":
        if device not in ("auto", "cpu"):
            raise UsageError(f"--device {device}: {recipe.name} is a NumPy model; it runs on the CPU")
        if precision is not None:
            raise UsageError(
                f"--precision: {recipe.name} computes in its own --dtype ({recorded}); drop the flag"
            )
        from cifarlab.numpy_nn.train import NumpyLearner

        learner: Any = NumpyLearner(model, cfg, ckpt.preprocess)
    else:
        from cifarlab.training.devices import resolve_device
        from cifarlab.training.torch_learner import TorchLearner

        # a run recorded before precision was recorded computed in fp32 (as --resume assumes)
        cfg = dataclasses.replace(cfg, precision=precision or recorded or "fp32")
        learner = TorchLearner(model, cfg, ckpt.preprocess, resolve_device(device))
    _, _, x_test, y_test = load_cifar10(data_dir, verify=verify)
    if cfg.test_images:
        x_test, y_test = x_test[: cfg.test_images], y_test[: cfg.test_images]
    ev = learner.evaluate(learner.put(x_test, y_test), final=True)
    used = {
        "model": recipe.name,
        "checkpoint": str(ckpt.path),
        "precision": learner.runtime()["precision"],
        "recorded_precision": recorded,
        "images": len(y_test),
    }
    return ev, used


def eval_main(args: argparse.Namespace) -> int:
    from cifarlab.plots import plot_confusion

    target = Path(args.target)
    out = Path(args.out) if args.out else _report_folder(target)
    check_writable_dir(out, "--out")
    run_dir = _run_of(target)
    if run_dir is not None:
        ev, meta = evaluate_run(run_dir, args.device, args.precision, args.data_dir, args.verify)
        cm, acc, loss, n = ev["confusion"], ev["acc"], ev["loss"], meta["images"]
    else:  # a bare checkpoint: its model on the whole test set, in fp32 (or --precision)
        logits_fn, meta = load_classifier(target, args.device, args.precision or "fp32")
        _, _, x_test, y_test = load_cifar10(args.data_dir, verify=args.verify)
        cm = confusion_matrix(y_test, logits_fn(x_test).argmax(1))
        acc, loss, n = int(np.trace(cm)) / len(y_test), None, len(y_test)
    per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_confusion(cm, CLASSES, out / "confusion.png", f"{meta.get('model')}: test accuracy {acc:.4f}")
    atomic_write_json(
        out / "eval.json",
        {
            "test_accuracy": acc,
            "test_loss": loss,
            "checkpoint": meta["checkpoint"],
            "images": n,
            "precision": meta.get("precision", "fp32"),
            "per_class_accuracy": dict(zip(CLASSES, per_class.tolist())),
            "confusion": cm.tolist(),
        },
    )
    how = meta.get("precision", "fp32")
    if meta.get("recorded_precision") not in (None, how):
        how += f", not the run's {meta['recorded_precision']} (--precision)"
    print(f"test accuracy {acc:.4f} on {n} images ({meta.get('model')}, {how})")
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
                if im.mode in (
                    "I;16",
                    "I;16B",
                    "I;16L",
                    "I;16N",
                    "I",
                ):  # 16-bit: scale to 8 bits, do not clip
                    wide = np.asarray(im, dtype=np.float64)
                    top = 65535.0 if im.mode.startswith("I;16") or wide.max() > 255 else 255.0
                    im = Image.fromarray(np.clip(wide / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
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
                json_safe(
                    {
                        path: {CLASSES[k]: float(p[k]) for k in np.argsort(-p)[:3]}
                        for path, p in zip(args.images, probs)
                    }
                ),
                allow_nan=False,
            )
        )
    return 0


def main(args: argparse.Namespace) -> int:
    return eval_main(args) if args.command == "eval" else predict_main(args)
