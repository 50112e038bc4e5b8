"""``cifarlab sweep activations``: the seed's "Tanh vs ELU" question, answered by measurement.

The same deep MLP (4 x 256 hidden, Adam 1e-3, seed preprocessing, no normalisation, so
nothing hides what the activation does) with ELU, Tanh and ReLU. Measured: test accuracy
(mean ± std over seeds), per-layer activation scale and Tanh saturation at initialisation,
per-layer weight-gradient norms at initialisation and during training.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from cifarlab.study.sweeps import common
from cifarlab.training.config import FIRST_SEED

ACTS = ("elu", "tanh", "relu")
HIDDEN = [256, 256, 256, 256]
STEPS, EVAL = 2000, 200


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_sweep_args(p, "activations")


def init_probe(activation: str, seed: int, x: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    """At initialisation, on one batch: each hidden layer's output std and saturated fraction
    (|h| > 0.99 for Tanh, h <= 0 i.e. zero gradient for ReLU), and each weight's gradient norm."""
    import torch
    import torch.nn.functional as F

    from cifarlab.data import Preprocess
    from cifarlab.models import create_model

    torch.manual_seed(seed)
    model = create_model("mlp", n_inputs=3072, n_hidden=HIDDEN, activation=activation)
    acts: list[torch.Tensor] = []
    hooks = [blk.act.register_forward_hook(lambda m, i, o: acts.append(o.detach())) for blk in model.hidden]
    xb = torch.from_numpy(Preprocess.fit("seed", x)(x[:200]))
    F.cross_entropy(model(xb), torch.from_numpy(y[:200])).backward()
    for h in hooks:
        h.remove()
    sat = {"tanh": lambda a: a.abs() > 0.99, "relu": lambda a: a <= 0, "elu": lambda a: a < -0.99}[activation]
    return {
        "act_std": [float(a.std()) for a in acts],
        "saturated": [float(sat(a).float().mean()) for a in acts],
        "grad_norm": [float(p.grad.norm()) for n, p in model.named_parameters() if p.ndim == 2],
    }


def jobs(seeds) -> list[common.Job]:
    """One run per activation and seed: the same deep MLP, gradient norms logged."""
    return [
        common.Job(f"{a}-seed{s}", "mlp", {"activation": a, "dnn_hidden_units": list(HIDDEN), "optimizer": "adam",
                                           "max_steps": STEPS, "eval_freq": EVAL, "seed": s, "log_grad_norms": True})
        for a in ACTS
        for s in seeds
    ]  # fmt: skip


def main(args: argparse.Namespace) -> int:
    common.set_folders(args, "activations")
    from cifarlab.data import load_cifar10

    seeds = [FIRST_SEED + s for s in range(args.seeds)]
    hidden = ",".join(map(str, HIDDEN))
    runs = common.run_jobs(jobs(seeds), args)
    x, y = load_cifar10(args.data_dir, verify=args.verify)[:2]
    layers = [f"hidden.{i}.linear.weight" for i in range(len(HIDDEN))] + ["output.weight"]

    lines = [
        "# Tanh vs ELU (vs ReLU), measured",
        "",
        f"Command: `cifarlab sweep activations --seeds {args.seeds}`. MLP {hidden} → 10, no normalisation, Adam lr 1e-3, "
        f"batch 200, {args.max_steps or STEPS} steps, seed preprocessing (pixels 0..255 minus the mean image), default "
        f"PyTorch init; {args.seeds} seed(s). Run directories: `{args.out_root}/`.",
        "",
        "| activation | final test accuracy | best | ‖∇W‖ layer 1 / output at init | ‖∇W₁‖ at end | hidden std at init (layer 1→4) | saturated at init (layer 1→4) |",
        "|---|---|---|---|---|---|---|",
    ]
    acc_series, grad_series = {}, {}
    for a in ACTS:
        rs = [runs[f"{a}-seed{s}"] for s in seeds]
        sums = [r.read_summary() for r in rs]
        probes = [init_probe(a, s, x, y) for s in seeds]
        g0 = np.mean([p["grad_norm"] for p in probes], axis=0)
        std0 = np.mean([p["act_std"] for p in probes], axis=0)
        sat0 = np.mean([p["saturated"] for p in probes], axis=0)
        evaluations = [r.evaluations() for r in rs]  # the records with gradient norms
        g_end = statistics.mean(e[-1]["grad_norms"][layers[0]] for e in evaluations)
        lines.append(
            f"| {a} | {common.mean_std([s['test_accuracy'] for s in sums])} | {common.mean_std([s['best_test_accuracy'] for s in sums])} "
            f"| {g0[0]:.3g} / {g0[-1]:.3g} | {g_end:.3g} | {' → '.join(f'{v:.3g}' for v in std0)} "
            f"| {' → '.join(f'{v:.0%}' for v in sat0)} |"
        )
        acc_series[a] = common.mean_curve(rs)
        grad_series[a] = common.mean_curve(rs, lambda m: m["grad_norms"][layers[0]])
    figures = [
        common.Figure(
            "activations", acc_series, "step", "test accuracy", "ELU vs Tanh vs ReLU: test accuracy"
        ),
        common.Figure(
            "activations_grad",
            grad_series,
            "step",
            "‖∇W‖ of the first hidden layer",
            "first-layer gradient norm during training",
            logy=True,
        ),
    ]
    common.publish(args, "activations", lines, figures)
    return 0
