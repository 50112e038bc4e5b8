"""The ``cifarlab`` command. Parses arguments and calls one function; no logic of its own.

Trainers and sweeps live in their own modules, imported only when asked for, so
``cifarlab train mlp-numpy`` never imports torch. Each such module exposes
``add_arguments(parser)`` and ``main(args) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cifarlab import __version__
from cifarlab.errors import UsageError, run_command
from cifarlab.training.config import PRECISIONS, add_data_args, add_device_arg, add_progress_arg
from cifarlab.training.config import ArgumentParser as _Parser

SWEEPS: dict[str, tuple[str, str]] = {
    "table1": ("cifarlab.study.sweeps.table1", "the seed's Table 1: seven PyTorch MLP configurations"),
    "activations": ("cifarlab.study.sweeps.activations", "ELU vs Tanh vs ReLU, with gradient norms"),
    "norms": ("cifarlab.study.sweeps.norms", "no norm vs BatchNorm vs LayerNorm across batch sizes"),
    "seeds": ("cifarlab.study.sweeps.seeds", "one recipe over several seeds: mean ± std"),
}


# commands that read or run many run directories: module with add_arguments(p) and main(args)
TOOLS: dict[str, tuple[str, str]] = {
    "runs": ("cifarlab.study.runlist", "list run directories: model, preset, steps, accuracy, time, status"),
    "compare": (
        "cifarlab.study.compare",
        "overlay runs' curves in one PNG and list the settings that differ",
    ),
    "report": (
        "cifarlab.study.report",
        "the seed's report regenerated from run directories (HTML + Markdown)",
    ),
    "reproduce": ("cifarlab.study.reproduce", "run every experiment the report needs, then the report"),
}


def sweeps() -> dict[str, str]:
    """name -> description of every sweep."""
    return {name: description for name, (_, description) in SWEEPS.items()}


def trainers() -> dict[str, str]:
    """name -> description of every model ``cifarlab train`` knows (cifarlab.training.recipes)."""
    from cifarlab.training.recipes import RECIPES

    return {name: r.description for name, r in RECIPES.items()}


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cifarlab", description=__doc__.splitlines()[0] if __doc__ else None)
    p.description = "Neural networks on CIFAR-10: NumPy backprop, PyTorch MLPs, ConvNets."
    p.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    data = sub.add_parser("data", help="download, verify or describe CIFAR-10")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    d = dsub.add_parser("download", help="download the official binary version (md5-checked)")
    d.add_argument(
        "--data-dir", metavar="DIR", help="target folder (default: $CIFARLAB_DATA or ~/.cache/cifarlab)"
    )
    d.add_argument("--url", help="mirror URL of cifar-10-binary.tar.gz")
    d.add_argument("--md5", help="expected md5 of the tarball at --url")
    add_progress_arg(d)
    v = dsub.add_parser("verify", help="check every file against its official md5")
    v.add_argument(
        "--data-dir", metavar="DIR", help="folder to check (default: $CIFARLAB_DATA or ~/.cache/cifarlab)"
    )
    i = dsub.add_parser("info", help="per-class counts and per-channel mean/std")
    add_data_args(i)

    for name, text, table in (
        ("train", "train a model; writes a run directory", trainers()),
        (
            "sweep",
            "run a family of experiments (tables and plots under runs/sweeps/)",
            sweeps(),
        ),
    ):
        sp = sub.add_parser(
            name,
            help=text,
            add_help=False,
            description=text + ". Available:\n" + "\n".join(f"  {k:18s} {d}" for k, d in table.items()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.add_argument("target", nargs="?", metavar="NAME", help=" | ".join(table))
        sp.add_argument("rest", nargs=argparse.REMAINDER)

    for name, (module, text) in TOOLS.items():
        tp = sub.add_parser(name, help=text, description=text)
        importlib.import_module(module).add_arguments(tp)

    e = sub.add_parser("eval", help="evaluate a run or checkpoint on the test set")
    e.add_argument("target", metavar="RUN_DIR|CHECKPOINT")
    e.add_argument("--out", metavar="DIR", help="where to write the report (default: the run directory)")
    e.add_argument(
        "--precision",
        choices=PRECISIONS[1:],
        help="compute in this precision instead of the run's own (default: the precision config.json "
        "records, so the accuracy is the run's final one; fp32 for a bare checkpoint)",
    )
    add_device_arg(e)
    add_data_args(e)
    pr = sub.add_parser("predict", help="top-3 classes for image files")
    pr.add_argument("checkpoint", metavar="CHECKPOINT")
    pr.add_argument("images", metavar="IMAGE", nargs="+")
    pr.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    add_device_arg(pr)
    return p


def _dispatch(kind: str, args: argparse.Namespace) -> int:
    """``cifarlab train NAME ...`` / ``cifarlab sweep NAME ...``: NAME's own parser, then its main."""
    table = trainers() if kind == "train" else sweeps()
    if args.target is None or args.target in ("-h", "--help"):
        print(f"usage: cifarlab {kind} NAME [options]   (cifarlab {kind} NAME --help for its options)\n")
        print("\n".join(f"  {k:18s} {d}" for k, d in table.items()))
        if args.target is None:
            raise UsageError(f"name what to {kind}: one of {', '.join(table)}")
        return 0
    if args.target not in table:
        raise UsageError(f"unknown {kind} target {args.target!r}; choose one of: {', '.join(table)}")
    sp = _Parser(prog=f"cifarlab {kind} {args.target}", description=table[args.target])
    if kind == "train":
        from cifarlab.training import train_command

        return train_command.run_argv([args.target, *args.rest])
    module = importlib.import_module(SWEEPS[args.target][0])
    module.add_arguments(sp)
    return module.main(sp.parse_args(args.rest)) or 0


def _data_command(args: argparse.Namespace) -> int:
    from cifarlab import data

    if args.data_command == "download":
        folder = data.find_dataset(args.data_dir)
        if folder is None:
            folder = data.download_cifar10(args.data_dir, url=args.url, md5=args.md5, progress=args.progress)
        print(f"CIFAR-10 ready in {folder}")
        return _data_command(argparse.Namespace(data_command="verify", data_dir=args.data_dir))
    if args.data_command == "verify":
        folder = data.find_dataset(args.data_dir)
        if folder is None:
            raise UsageError(f"no CIFAR-10 in {data.data_root(args.data_dir)}: run `cifarlab data download`")
        bad = 0
        for name, fault in data.verify_dataset(folder):
            print(f"{'OK ' if fault is None else 'BAD'} {folder / name}" + (f": {fault}" if fault else ""))
            bad += fault is not None
        if bad:
            print(f"cifarlab: error: {bad} file(s) failed verification in {folder}", file=sys.stderr)
            return 2
        print(f"all {len(data.MD5[folder.name])} files match the official md5s")
        return 0
    if args.data_command == "info":
        x_train, y_train, x_test, y_test = data.load_cifar10(args.data_dir, verify=args.verify)
        print(f"folder: {data.find_dataset(args.data_dir)}")
        print(f"train {x_train.shape} {x_train.dtype}, test {x_test.shape} {x_test.dtype}")
        print(f"{'class':12s} {'train':>6s} {'test':>6s}")
        for c, a, b in zip(data.CLASSES, data.class_counts(y_train), data.class_counts(y_test)):
            print(f"{c:12s} {a:6d} {b:6d}")
        mean, std = data.channel_stats(x_train)
        print("train channel mean (R,G,B, 0..255): " + ", ".join(f"{m:.2f}" for m in mean))
        print("train channel std  (R,G,B, 0..255): " + ", ".join(f"{s:.2f}" for s in std))
        return 0
    raise UsageError("cifarlab data: choose an action: download, verify or info (see --help)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug counts anywhere (`cifarlab --debug train ...` and `cifarlab train ... --debug`);
    # it is taken out here, so that no subcommand's parser has to know it
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]

    return run_command(lambda: _run(argv), debug)


def _run(argv: list[str]) -> int:
    if argv[:1] in (["train"], ["sweep"]) and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        return _dispatch(argv[0], argparse.Namespace(target=(argv[1:] or [None])[0], rest=[]))
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "data":
        return _data_command(args)
    if args.command in ("train", "sweep"):
        return _dispatch(args.command, args)
    if args.command in TOOLS:
        return importlib.import_module(TOOLS[args.command][0]).main(args) or 0
    from cifarlab.study import inference  # eval / predict

    return inference.main(args)


if __name__ == "__main__":
    raise SystemExit(main())
