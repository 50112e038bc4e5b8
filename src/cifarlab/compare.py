"""`cifarlab compare` (to be written)."""

from __future__ import annotations

import argparse

from cifarlab.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    raise UsageError("cifarlab compare is not written yet")
