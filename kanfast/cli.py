"""The ``kanfast`` command: benchmark, validate, fit.

    kanfast bench                 # throughput and memory against baselines (CPU-sized default)
    kanfast validate              # every backend against the float64 reference
    kanfast fit digits            # KAN vs MLP on scikit-learn's digits
    kanfast fit toy               # the paper's f(x,y) = exp(sin(pi x) + y^2), grid extension

Only the module of the command given is imported (``kanfast --help`` imports no torch), and
every argument is checked before any work: a bad one ends the command with a one-line
message and exit status 2; a missing optional package (``pip install 'kanfast[cli]'``) with
exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "missing_packages"]

#: command -> (help, module, function adding its options, function checking them, function running it)
_COMMANDS: Dict[str, Tuple[str, str, str, Optional[str], str]] = {
    "bench": ("time forward and forward+backward against baselines; writes JSON and CSV",
              "kanfast.benchmarks.bench", "add_arguments", "check_arguments", "run"),
    "validate": ("compare every available backend with the reference",
                 "kanfast.validate", "add_arguments", "check_arguments", "run"),
}
#: ``kanfast fit`` tasks, as above
_FIT_TASKS: Dict[str, Tuple[str, str, str, Optional[str], str]] = {
    "digits": ("KAN([64,32,10]) vs MLP on scikit-learn's digits",
               "kanfast.tasks", "add_digits_arguments", "check_digits_arguments", "run_digits"),
    "toy": ("f(x,y) = exp(sin(pi x) + y^2) with KAN([2,5,1]) and grid extension",
            "kanfast.toy", "add_toy_arguments", "check_toy_arguments", "run_toy"),
}

#: import name -> pip name of the packages the command needs beyond the core install (all in kanfast[cli])
_PIP_NAMES = {"tqdm": "tqdm", "rich": "rich", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "sympy": "sympy"}


def _needs(args: argparse.Namespace) -> List[str]:
    """Import names of the optional packages this command will import."""
    need = {"bench": ["tqdm"], "validate": [], "digits": ["sklearn", "tqdm"],
            "toy": [] if getattr(args, "no_symbolic", False) else ["sympy"]}[args.task or args.command]
    if getattr(args, "plot", None):
        need.append("matplotlib")
    return need


def missing_packages(names: Sequence[str]) -> List[str]:
    """The import names in ``names`` that cannot be imported here (found without importing them)."""
    missing = []
    for name in names:
        if name in sys.modules:
            ok = sys.modules[name] is not None
        else:
            try:
                ok = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                ok = False
        if not ok:
            missing.append(name)
    return missing


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless the help already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if re.search(r"\bdefault[: ]", text):  # "(default 2048)", "default: torch's"
            return text
        return super()._get_help_string(action)


def _first_word(argv: Sequence[str]) -> Optional[str]:
    """The first argument that is not an option (the command or task named), or None."""
    for tok in argv:
        if tok == "--":
            return None
        if not tok.startswith("-"):
            return tok
    return None


def _add(sub, name: str, entry, populate: bool) -> argparse.ArgumentParser:
    help_text, module, add, check, run = entry
    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
    if populate:
        mod = importlib.import_module(module)
        getattr(mod, add)(p)
        p.set_defaults(func=getattr(mod, run), check=getattr(mod, check) if check else None, command_parser=p)
    return p


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The ``kanfast`` parser. With ``argv``, only the command (and task) it names gets its options,
    so that only that command's module is imported; without, every command gets them."""
    argv = None if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="kanfast", description="Fast exact B-spline KAN layers for PyTorch.",
                                     formatter_class=_HelpFormatter)
    parser.set_defaults(task=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None if argv is None else _first_word(argv)
    for name, entry in _COMMANDS.items():
        _add(sub, name, entry, argv is None or chosen == name)
    p_fit = sub.add_parser("fit", help="train on a built-in task", description="Train on a built-in task.",
                           formatter_class=_HelpFormatter)
    fit_sub = p_fit.add_subparsers(dest="task", metavar="TASK", required=True)
    task = None
    if argv is not None and chosen == "fit":
        task = _first_word(argv[argv.index("fit") + 1:])
    for name, entry in _FIT_TASKS.items():
        _add(fit_sub, name, entry, argv is None or (chosen == "fit" and task == name))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``kanfast`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status
    (bad arguments: ``SystemExit(2)`` from argparse, with a one-line message)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    command = f"kanfast {args.command}" + (f" {args.task}" if args.task else "")
    missing = missing_packages(_needs(args))
    if missing:
        names = ", ".join(_PIP_NAMES.get(m, m) for m in missing)
        print(f"{command}: needs {names}, not installed; install the command's extra: pip install 'kanfast[cli]'",
              file=sys.stderr)
        return 1
    check: Optional[Callable] = args.check
    if check is not None:
        try:
            check(args)
        except ValueError as e:
            args.command_parser.error(str(e))
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
