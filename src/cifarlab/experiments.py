"""The study: every experiment of the seed's report (and what goes beyond it), as data.

``cifarlab reproduce`` runs them and ``cifarlab report`` finds their run directories. An
experiment is a ``cifarlab train`` command line, run over one or more seeds. A run
directory belongs to an experiment when its model and settings are exactly the ones that
command line gives: the report finds the runs by what they are, wherever they were made (by
``reproduce``, a sweep, or by hand). In the *quick* budget every experiment runs once, for a
few steps, so that every section of the report exists within minutes. Those numbers show that
the pipeline works; they are not results, and the report labels them as such.
"""

from __future__ import annotations

from dataclasses import dataclass

from cifarlab.config import BOOKKEEPING, FIRST_SEED
from cifarlab.sweeps import activations, norms, table1

BUDGETS = ("quick", "full")


@dataclass(frozen=True)
class Experiment:
    """One ``cifarlab train`` command line of the study, over ``seeds`` seeds (full budget)."""

    name: str  # run directory name (before the seed suffix), unique
    section: str  # the report section it belongs to (see SECTIONS)
    label: str  # how tables name it
    argv: tuple[str, ...]  # `cifarlab train` arguments, model first, without --seed
    quick: tuple[str, ...]  # flags added (or replacing the full ones) in the quick budget
    seeds: int = 1
    seed_result: float | None = None  # the seed report's test accuracy, where it has one

    def command(self, budget: str, seed: int = FIRST_SEED) -> list[str]:
        """The exact `cifarlab train` arguments of one run."""
        argv = [*self.argv, "--seed", str(seed)]
        for flag, value in zip(self.quick[::2], self.quick[1::2]) if budget == "quick" else ():
            if flag in argv:  # the quick value replaces the full one (a shorter command, same settings)
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        return argv

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
_QUICK_TEST = ("--test-images", "1000")
_QUICK_CONV = ("--max-steps", "2", "--eval-freq", "2", "--test-images", "200", "--batch-size", "32")
_QUICK_TRANSFER = ("--max-steps", "4", "--eval-freq", "2", "--test-images", "200", "--image-size", "32")


def _from_sweep(job_argv: list[str]) -> tuple[str, ...]:
    """A sweep job's argv without its --seed (the experiment adds the seed)."""
    i = job_argv.index("--seed")
    return tuple(job_argv[:i] + job_argv[i + 2 :])


def catalogue() -> list[Experiment]:
    """Every experiment, in report order."""
    exps = [
        Experiment("mlp-numpy-seed", "part1", "NumPy MLP, seed protocol", ("mlp-numpy", "--preset", "seed"),
                   seeds=3, quick=("--max-steps", "100", "--eval-freq", "50", *_QUICK_TEST), seed_result=0.4813),
    ]  # fmt: skip
    for i, job in enumerate(table1.jobs(range(1, len(table1.CONFIGS) + 1), [FIRST_SEED]), 1):
        hidden, opt, lr, steps, seed_acc = table1.CONFIGS[i - 1]
        exps.append(
            Experiment(f"table1-config{i}", "part2", f"{i}: {hidden} {opt} lr={lr:g} {steps} steps",
                       _from_sweep(job.argv), seeds=3, quick=("--max-steps", "60", "--eval-freq", "30", *_QUICK_TEST),
                       seed_result=seed_acc)
        )  # fmt: skip
    for job in activations.jobs([FIRST_SEED]):
        act = job.argv[job.argv.index("--activation") + 1]
        exps.append(
            Experiment(f"activation-{act}", "part2", act, _from_sweep(job.argv), seeds=3,
                       quick=("--max-steps", "60", "--eval-freq", "30", *_QUICK_TEST))
        )  # fmt: skip
    for job in norms.jobs([FIRST_SEED]):
        norm, b = job.name.split("-")[:2]
        exps.append(
            Experiment(f"norms-{norm}-{b}", "part3", f"{norm} {b.replace('b', 'B=')}", _from_sweep(job.argv),
                       quick=("--max-steps", "40", "--eval-freq", "20", *_QUICK_TEST))
        )  # fmt: skip
    exps += [
        Experiment("convnet-seed", "part4", "ConvNet, seed protocol", ("convnet", "--preset", "seed"),
                   quick=_QUICK_CONV, seed_result=0.7597),
        Experiment("efficientnet-finetune", "part4b", "EfficientNet-Lite0 from ImageNet, fine-tuned",
                   ("efficientnet_lite0", "--preset", "finetune"), quick=_QUICK_TRANSFER, seed_result=0.82),
        Experiment("mlp-numpy-best", "beyond", "NumPy MLP, best preset", ("mlp-numpy", "--preset", "best"),
                   quick=("--max-steps", "30", "--eval-freq", "15", "--warmup-steps", "5", *_QUICK_TEST)),
        Experiment("mlp-best", "beyond", "PyTorch MLP, best preset", ("mlp", "--preset", "best"),
                   quick=("--max-steps", "30", "--eval-freq", "15", *_QUICK_TEST)),
        Experiment("convnet-best", "beyond", "ConvNet, best preset", ("convnet", "--preset", "best"),
                   quick=_QUICK_CONV),
        Experiment("efficientnet-best", "beyond", "EfficientNet-Lite0, best preset",
                   ("efficientnet_lite0", "--preset", "best"), quick=_QUICK_TRANSFER),
        Experiment("fast", "beyond", "the fast recipe (airbench94's parts), from scratch", ("fast",),
                   quick=("--max-steps", "2", "--batch-size", "128", "--eval-freq", "2", "--test-images", "200")),
        Experiment("fast-lookahead", "beyond", "fast without the 23 % peak and the whitening-bias freeze",
                   ("fast", "--lr-peak", "0.25", "--whiten-bias-epochs", "0"),
                   quick=("--max-steps", "3", "--batch-size", "128", "--eval-freq", "3", "--test-images", "200")),
        Experiment("fast-v1", "beyond", "fast as it was: no Lookahead, schedule ends, bias decay or freeze",
                   ("fast", "--lookahead", "0", "--lr-start", "0", "--lr-end", "0", "--lr-peak", "0.25",
                    "--no-decay-biases", "--whiten-bias-epochs", "0"),
                   quick=("--max-steps", "4", "--batch-size", "128", "--eval-freq", "4", "--test-images", "200")),
    ]  # fmt: skip
    return exps


def expected_settings(exp: Experiment, budget: str, seed: int = FIRST_SEED) -> tuple[str, dict]:
    """(model, settings) that ``cifarlab train`` would run this experiment with."""
    from cifarlab.sweeps.common import job_settings

    model, settings, _ = job_settings(exp.command(budget, seed))
    return model, settings


def matches(config: dict, model: str, settings: dict) -> bool:
    """Does a run's config.json describe this model with these settings? The seed, the
    precision (how it computed, like the device: the report shows it beside the run) and the
    settings that do not change the numbers (config.BOOKKEEPING) are not compared."""
    from cifarlab.sweeps.common import same_settings

    return config.get("model") == model and same_settings(
        config, settings, BOOKKEEPING | {"seed", "precision"}
    )
