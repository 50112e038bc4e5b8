"""The one checkpoint format, written and read for the NumPy and the torch trainers alike.

A checkpoint is a folder of two safetensors files (plain arrays: no code runs on load):

  model.safetensors   the weights, ``__preprocess__.shift`` / ``__preprocess__.scale``, and
                      metadata ``cifarlab`` = JSON {format_version, model, model_kwargs, preprocess}
  state.safetensors   optimizer buffers and RNG state, metadata ``state`` (TrainState JSON) and
                      ``plain`` (the rest of the optimizer state as JSON); only to resume

Arrays are NumPy (``safetensors.numpy``), so reading a NumPy run never imports torch. A new
checkpoint is written beside the old one and swapped in by renames: a crash leaves the old
checkpoint or the new one, never a mix. Everything read is validated; a foreign or damaged
file is a one-line ``CheckpointError``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.choices import PREPROCESSINGS
from cifarlab.data import Preprocess
from cifarlab.errors import CheckpointError, reason
from cifarlab.training.runs import CHECKPOINT_DIR, NEW_SUFFIX, OLD_SUFFIX

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE = "model.safetensors", "state.safetensors"
PREP_SHIFT, PREP_SCALE = "__preprocess__.shift", "__preprocess__.scale"
# shapes the preprocessing arrays may have: per pixel (the seed's mean image) or per channel
_PREP_SHAPES = {PREP_SHIFT: ((32, 32, 3), (3,)), PREP_SCALE: ((1,), (3,))}


@dataclass
class Checkpoint:
    """A model checkpoint: everything ``create_model`` + ``load_state_dict`` need."""

    model: str
    model_kwargs: dict[str, Any]
    preprocess: Preprocess
    weights: dict[str, np.ndarray]
    path: Path | None = None  # the model.safetensors it was read from


def save(
    folder: Path,
    weights: dict[str, np.ndarray],
    meta: dict[str, Any],
    prep: Preprocess,
    state_tensors: dict[str, np.ndarray]
    | None = None,  # 0-d arrays stay 0-d (np.asarray, not ascontiguousarray)
    state_meta: dict[str, str] | None = None,
) -> Path:
    """Write ``folder`` (model + optional trainer state) atomically; returns it.

    ``meta`` holds ``model`` and ``model_kwargs``; ``format_version`` and ``preprocess`` are added.
    A failure to write (a full disk) is one CheckpointError; the previous checkpoint stays.
    """
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + NEW_SUFFIX), folder.with_name(folder.name + OLD_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        return _save(folder, tmp, old, weights, meta, prep, state_tensors, state_meta)
    except Exception as e:  # a full disk (safetensors' own error type), a read-only folder...
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CheckpointError):
            raise
        why = " ".join(str(e).split())[:200] or type(e).__name__
        kept = (
            "the previous checkpoint is intact"
            if folder.exists()
            else f"the previous one is in {old.name}, which --resume recovers"
            if old.exists()
            else "no checkpoint was kept"
        )
        raise CheckpointError(f"{folder}: could not write the checkpoint ({why}); {kept}") from None


def _save(folder, tmp, old, weights, meta, prep, state_tensors, state_meta) -> Path:
    from safetensors.numpy import save_file

    tmp.mkdir(parents=True)
    tensors = {k: np.asarray(v, order="C") for k, v in weights.items()}
    tensors[PREP_SHIFT] = np.asarray(prep.shift, dtype=np.float32, order="C")
    tensors[PREP_SCALE] = np.asarray(prep.scale, dtype=np.float32, order="C")
    header = {"format_version": FORMAT_VERSION, **meta, "preprocess": prep.name}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"cifarlab": json.dumps(header)})
    if state_tensors is not None:
        state = {k: np.asarray(v, order="C") for k, v in state_tensors.items()}
        save_file(state, str(tmp / STATE_FILE), metadata=state_meta or {})
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def recover(folder: Path) -> None:
    """After a crash between the two renames of :func:`save` only ``<folder>.old`` exists:
    put it back (call only while holding the run directory's lock)."""
    folder, old = Path(folder), Path(folder).with_name(Path(folder).name + OLD_SUFFIX)
    if not folder.exists() and (old / MODEL_FILE).is_file():
        old.rename(folder)


def model_file(target: str | Path) -> Path:
    """The model file a user named: the file itself, ``DIR/model.safetensors`` for a
    checkpoint folder, or ``RUN/checkpoint/model.safetensors`` for a run directory."""
    target = Path(target)
    if target.is_file():
        return target
    for cand in (target / MODEL_FILE, target / CHECKPOINT_DIR / MODEL_FILE):
        if cand.is_file():
            return cand
    if not target.exists():
        raise CheckpointError(f"{target} does not exist (give a run directory or a model.safetensors file)")
    hint = ""
    if (target / (CHECKPOINT_DIR + OLD_SUFFIX) / MODEL_FILE).is_file():
        hint = "; an interrupted save left checkpoint.old: `cifarlab train MODEL --resume` recovers it"
    raise CheckpointError(
        f"no checkpoint in {target} (expected {MODEL_FILE} or checkpoint/{MODEL_FILE}){hint}"
    )


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All arrays and the metadata of one safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # any parse failure: the library raises several types
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason(e, 120)})") from None


def load(target: str | Path) -> Checkpoint:
    """Read and validate the model checkpoint ``target`` names (see :func:`model_file`)."""
    from cifarlab.registry import is_model

    path = model_file(target)
    weights, metadata = _read(path)
    if "cifarlab" not in metadata:
        raise CheckpointError(f"{path}: not a cifarlab checkpoint (no 'cifarlab' metadata)")
    try:
        meta = json.loads(metadata["cifarlab"])
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: its 'cifarlab' metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its 'cifarlab' metadata is not a JSON object")
    version = meta.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version!r}; this cifarlab reads {FORMAT_VERSION}")
    model, kwargs, prep_name = meta.get("model"), meta.get("model_kwargs", {}), meta.get("preprocess")
    if not isinstance(model, str) or not is_model(model):
        raise CheckpointError(f"{path}: unknown model {model!r} in its metadata")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: model_kwargs is not a JSON object")
    if prep_name not in PREPROCESSINGS:
        raise CheckpointError(f"{path}: unknown preprocessing {prep_name!r}")
    prep_arrays = {key: weights.pop(key, None) for key in _PREP_SHAPES}
    for key, arr in prep_arrays.items():
        shapes = _PREP_SHAPES[key]
        if arr is None or arr.shape not in shapes or arr.dtype != np.float32 or not np.isfinite(arr).all():
            got = "missing" if arr is None else f"{arr.dtype}{arr.shape}"
            raise CheckpointError(f"{path}: preprocessing array {key} is {got}; expected float32 {shapes}")
    prep = Preprocess(prep_name, prep_arrays[PREP_SHIFT], prep_arrays[PREP_SCALE])
    return Checkpoint(model, kwargs, prep, weights, path)


def load_state(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The trainer-state arrays and metadata of checkpoint ``folder`` (to resume)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint cannot be resumed")
    return _read(path)


def build_model(ckpt: Checkpoint) -> Any:
    """The checkpoint's model with its weights loaded, in eval mode for torch models.

    Pretrained weights are never fetched: the checkpoint holds all of them."""
    from cifarlab.registry import create_model, get_model_entry

    kwargs = dict(ckpt.model_kwargs)
    if "pretrained" in kwargs:
        kwargs["pretrained"] = False
    torch_model = get_model_entry(ckpt.model).framework == "torch"
    try:
        with warnings.catch_warnings():  # a warning while building from a checkpoint means bad arguments
            warnings.simplefilter("error")
            model = create_model(ckpt.model, **kwargs)
        if torch_model:
            import torch

            model.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.weights.items()})
            model.eval()
        else:
            model.load_state_dict(ckpt.weights)
    except Exception as e:  # any failure to build or fill the model from these arguments and weights
        raise CheckpointError(
            f"{ckpt.path}: checkpoint does not match its model {ckpt.model} ({reason(e)})"
        ) from None
    return model
