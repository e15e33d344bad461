"""The ``kanfast`` command: benchmark, validate, fit.

    kanfast bench                 # throughput and memory against baselines (CPU-sized default)
    kanfast validate              # every backend against the float64 reference
    kanfast fit digits            # KAN vs MLP on scikit-learn's digits
    kanfast fit toy               # the paper's f(x,y) = exp(sin(pi x) + y^2), grid extension
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kanfast", description="Fast exact B-spline KAN layers for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_bench = sub.add_parser("bench", help="time forward and forward+backward against baselines; writes JSON")
    from .benchmarks import bench

    bench.add_arguments(p_bench)
    p_bench.set_defaults(func=bench.run)

    p_val = sub.add_parser("validate", help="compare every available backend with the reference")
    from . import validate

    validate.add_arguments(p_val)
    p_val.set_defaults(func=validate.run)

    p_fit = sub.add_parser("fit", help="train on a built-in task")
    fit_sub = p_fit.add_subparsers(dest="task", metavar="TASK", required=True)
    from . import tasks, toy

    p_digits = fit_sub.add_parser("digits", help="KAN([64,32,10]) vs MLP on scikit-learn's digits")
    tasks.add_digits_arguments(p_digits)
    p_digits.set_defaults(func=tasks.run_digits)
    p_toy = fit_sub.add_parser("toy", help="f(x,y) = exp(sin(pi x) + y^2) with KAN([2,5,1]) and grid extension")
    toy.add_toy_arguments(p_toy)
    p_toy.set_defaults(func=toy.run_toy)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
