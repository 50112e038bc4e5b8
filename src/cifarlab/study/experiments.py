"""The study: every experiment of the seed's report (and what goes beyond it), as data.

``cifarlab reproduce`` runs them and ``cifarlab report`` finds their run directories. An
experiment is a model, a preset and the settings it changes (``recipes.resolve`` turns them
into a config, no command line involved), run over one or more seeds. A run directory
belongs to an experiment when its model and settings are exactly the resolved ones: the
report finds the runs by what they are, wherever they were made (by ``reproduce``, a sweep,
or by hand). In the *quick* budget every experiment runs once, for a
few steps, so that every section of the report exists within minutes. Those numbers show that
the pipeline works; they are not results, and the report labels them as such.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cifarlab.study.sweeps import activations, norms, table1
from cifarlab.study.sweeps.common import Job
from cifarlab.training.config import FIRST_SEED, TrainConfig, bookkeeping
from cifarlab.training.recipes import RECIPES, command_line, resolve

BUDGETS = ("quick", "full")


@dataclass(frozen=True)
class Experiment:
    """One configuration of the study, as data: ``cifarlab train MODEL --preset PRESET`` with
    ``settings``, over ``seeds`` seeds (full budget)."""

    name: str  # run directory name (before the seed suffix), unique
    section: str  # the report section it belongs to (see SECTIONS)
    label: str  # how tables name it
    model: str
    settings: dict[str, Any]  # settings over the preset's, without the seed
    quick: dict[str, Any]  # settings added (or replacing the full ones) in the quick budget
    preset: str | None = None
    seeds: int = 1
    seed_result: float | None = None  # the seed report's test accuracy, where it has one

    def overrides(self, budget: str, seed: int = FIRST_SEED) -> dict[str, Any]:
        """The settings one run gives over the preset's."""
        return {**self.settings, **(self.quick if budget == "quick" else {}), "seed": seed}

    def config(self, budget: str, seed: int = FIRST_SEED) -> TrainConfig:
        """The exact config of one run (no command line involved)."""
        return resolve(self.model, self.preset, self.overrides(budget, seed))

    def command(self, budget: str, seed: int = FIRST_SEED) -> list[str]:
        """The `cifarlab train` arguments of one run."""
        return command_line(self.model, self.preset, self.overrides(budget, seed))

    def run_seeds(self, budget: str) -> list[int]:
        return [FIRST_SEED + s for s in range(1 if budget == "quick" else self.seeds)]

    def shell(self, budget: str) -> str:
        """The command a reader can paste (the first seed's)."""
        return "cifarlab train " + " ".join(self.command(budget))


SECTIONS = {
    "part1": "Part 1: MLP in NumPy, backprop by hand",
    "part2": "Part 2: MLP in PyTorch (Table 1, Tanh vs ELU)",
    "part3": "Part 3: LayerNorm as a custom op",
    "part4": "Part 4: ConvNet",
    "part4b": "Part 4b: transfer learning",
    "beyond": "Beyond the seed: the best presets",
}

# In the quick budget every run evaluates a subset of the test set: for the MLPs a full evaluation
# of 10,000 images costs more than their few steps, for ConvNet and EfficientNet more than the run.
_QUICK_TEST = {"test_images": 1000}
_QUICK_CONV = {"max_steps": 2, "eval_freq": 2, "test_images": 200, "batch_size": 32}
_QUICK_TRANSFER = {"max_steps": 4, "eval_freq": 2, "test_images": 200, "image_size": 32}


def _steps(max_steps: int, eval_freq: int, **more: Any) -> dict[str, Any]:
    return {"max_steps": max_steps, "eval_freq": eval_freq, **more}


def _from_sweep(job: Job) -> dict[str, Any]:
    """A sweep job's settings without its seed (the experiment adds the seed)."""
    return {k: v for k, v in job.settings.items() if k != "seed"}


def catalogue() -> list[Experiment]:
    """Every experiment, in report order."""
    exps = [
        Experiment("mlp-numpy-seed", "part1", "NumPy MLP, seed protocol", "mlp-numpy", {}, preset="seed",
                   seeds=3, quick=_steps(100, 50, **_QUICK_TEST), seed_result=0.4813),
    ]  # fmt: skip
    for i, job in enumerate(table1.jobs(range(1, len(table1.CONFIGS) + 1), [FIRST_SEED]), 1):
        hidden, opt, lr, steps, seed_acc = table1.CONFIGS[i - 1]
        exps.append(
            Experiment(f"table1-config{i}", "part2", f"{i}: {hidden} {opt} lr={lr:g} {steps} steps", job.model,
                       _from_sweep(job), seeds=3, quick=_steps(60, 30, **_QUICK_TEST), seed_result=seed_acc)
        )  # fmt: skip
    for job in activations.jobs([FIRST_SEED]):
        act = job.settings["activation"]
        exps.append(
            Experiment(f"activation-{act}", "part2", act, job.model, _from_sweep(job), seeds=3,
                       quick=_steps(60, 30, **_QUICK_TEST))
        )  # fmt: skip
    for job in norms.jobs([FIRST_SEED]):
        norm, b = job.name.split("-")[:2]
        exps.append(
            Experiment(f"norms-{norm}-{b}", "part3", f"{norm} {b.replace('b', 'B=')}", job.model, _from_sweep(job),
                       quick=_steps(40, 20, **_QUICK_TEST))
        )  # fmt: skip
    fast_quick = {"batch_size": 128, "test_images": 200}
    exps += [
        Experiment("convnet-seed", "part4", "ConvNet, seed protocol", "convnet", {}, preset="seed",
                   quick=_QUICK_CONV, seed_result=0.7597),
        Experiment("efficientnet-finetune", "part4b", "EfficientNet-Lite0 from ImageNet, fine-tuned",
                   "efficientnet_lite0", {}, preset="finetune", quick=_QUICK_TRANSFER, seed_result=0.82),
        Experiment("mlp-numpy-best", "beyond", "NumPy MLP, best preset", "mlp-numpy", {}, preset="best",
                   quick=_steps(30, 15, warmup_steps=5, **_QUICK_TEST)),
        Experiment("mlp-best", "beyond", "PyTorch MLP, best preset", "mlp", {}, preset="best",
                   quick=_steps(30, 15, **_QUICK_TEST)),
        Experiment("convnet-best", "beyond", "ConvNet, best preset", "convnet", {}, preset="best",
                   quick=_QUICK_CONV),
        Experiment("efficientnet-best", "beyond", "EfficientNet-Lite0, best preset", "efficientnet_lite0", {},
                   preset="best", quick=_QUICK_TRANSFER),
        Experiment("fast", "beyond", "the fast recipe (airbench94's parts), from scratch", "fast", {},
                   quick=_steps(2, 2, **fast_quick)),
        Experiment("fast-lookahead", "beyond", "fast without the 23 % peak and the whitening-bias freeze",
                   "fast", {"lr_peak": 0.25, "whiten_bias_epochs": 0}, quick=_steps(3, 3, **fast_quick)),
        Experiment("fast-v1", "beyond", "fast as it was: no Lookahead, schedule ends, bias decay or freeze",
                   "fast", {"lookahead": 0, "lr_start": 0.0, "lr_end": 0.0, "lr_peak": 0.25, "decay_biases": False,
                            "whiten_bias_epochs": 0}, quick=_steps(4, 4, **fast_quick)),
    ]  # fmt: skip
    return exps


def expected_settings(exp: Experiment, budget: str, seed: int = FIRST_SEED) -> tuple[str, dict]:
    """(model, settings) that one run of this experiment runs with."""
    return exp.model, dataclasses.asdict(exp.config(budget, seed))


def matches(config: dict, model: str, settings: dict) -> bool:
    """Does a run's config.json describe this model with these settings? The seed, the
    precision (how it computed, like the device: the report shows it beside the run) and the
    settings that do not change the numbers (``config.bookkeeping``) are not compared."""
    from cifarlab.study.sweeps.common import same_settings

    return config.get("model") == model and same_settings(
        config, settings, bookkeeping(RECIPES[model].config) | {"seed", "precision"}
    )
