"""``kanfast fit toy``: the KAN paper's workflow end to end on a toy formula
(Liu et al. 2024, arXiv:2404.19756, sec. 2.5 / fig. 2.4):

1. train ``[2, 5, 1]`` (grid ``--prune-grid``, 5) with the sparsification
   regulariser (LBFGS), prune (repeat while pruning removes nodes);
2. grid extension ``3 -> 5 -> 10 -> 20`` (:meth:`KAN.extend_grid`; the first step
   may coarsen from the pruning grid), retraining at each size (train / test
   RMSE printed per grid size);
3. ``auto_symbolic``, a short retrain of the affine parameters, the recovered
   formula (sympy) and its RMSE on the test set (evaluated from the formula
   itself, not the network);
4. optionally ``--plot out.png``.

The CLI wires ``kanfast fit toy`` to :func:`add_toy_arguments` / :func:`run_toy`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .benchmarks import provenance
from .cli_checks import IMAGE_SUFFIXES, check_memory, check_outputs, float_range, int_list, int_range, name_list, open_output

__all__ = ["TOY_FUNCTIONS", "add_toy_arguments", "check_toy_arguments", "run_toy", "toy_workflow", "make_dataset",
           "format_formula", "scaling_slopes", "SCALING_GRIDS"]

#: name -> (number of inputs, torch function of x (N, n_var) -> (N, 1), formula text)
TOY_FUNCTIONS: Dict[str, Tuple[int, Callable[[torch.Tensor], torch.Tensor], str]] = {
    "paper": (2, lambda x: torch.exp(torch.sin(math.pi * x[:, :1]) + x[:, 1:2] ** 2), "exp(sin(pi*x_1) + x_2^2)"),
    "xy": (2, lambda x: x[:, :1] * x[:, 1:2], "x_1*x_2"),
    "sin": (1, lambda x: torch.sin(math.pi * x[:, :1]), "sin(pi*x_1)"),
    "sqrt": (2, lambda x: torch.sqrt(x[:, :1] ** 2 + x[:, 1:2] ** 2), "sqrt(x_1^2 + x_2^2)"),
}


def make_dataset(name: str, n: int, generator: torch.Generator, dtype=torch.float64):
    """``(x, y)``: ``x`` uniform on ``[-1, 1]^n_var`` ``(n, n_var)``, ``y = f(x)`` ``(n, 1)``."""
    n_var, fn, _ = TOY_FUNCTIONS[name]
    x = torch.rand(n, n_var, generator=generator, dtype=dtype) * 2 - 1
    return x, fn(x)


_int_list = int_list(1)


def add_toy_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``kanfast fit toy`` options to ``parser`` (returned)."""
    parser.add_argument("--function", choices=sorted(TOY_FUNCTIONS), default="paper",
                        help="toy target (default: the paper's exp(sin(pi x) + y^2))")
    parser.add_argument("--width", type=_int_list, default=None,
                        help="hidden widths incl. in/out, e.g. 2,5,1 (default: [n_var, 5, 1])")
    parser.add_argument("--grids", type=_int_list, default=None,
                        help="grid sizes, e.g. 3,5,10,20 (default: 3,5,10,20; with --scaling: 3,5,10,...,1000)")
    parser.add_argument("--steps", type=int_range(0), default=None,
                        help="LBFGS steps per grid size (default: 50; with --scaling: 200)")
    parser.add_argument("--scaling", action="store_true",
                        help="the paper's scaling curve (fig. 2.3): grids up to 1000, 200 steps each, no symbolic "
                             "step; prints RMSE per grid and the fitted slope of RMSE against G")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="with --scaling: write the curve as JSON there and as a PNG beside it (same stem)")
    parser.add_argument("--reg-steps", type=int_range(0), default=20,
                        help="LBFGS steps with the regulariser before each prune")
    nonneg = float_range(0)
    parser.add_argument("--lamb", type=nonneg, default=0.01, help="weight of the sparsification regulariser")
    parser.add_argument("--lamb-l1", type=nonneg, default=1.0, help="weight of the L1 part of the regulariser")
    parser.add_argument("--lamb-entropy", type=nonneg, default=10.0, help="weight of the entropy part of the regulariser")
    parser.add_argument("--prune-rounds", type=int_range(0), default=3, help="max rounds of (regularised training, prune)")
    parser.add_argument("--prune-grid", type=int_range(1), default=5,
                        help="grid size of the regularised training and pruning phase (then --grids follow)")
    parser.add_argument("--node-threshold", type=nonneg, default=1e-2, help="prune nodes whose importance is below")
    parser.add_argument("--edge-threshold", type=nonneg, default=3e-2, help="prune edges whose importance is below")
    parser.add_argument("--no-prune", action="store_true", help="skip regularised training and pruning")
    parser.add_argument("--no-symbolic", action="store_true", help="skip auto_symbolic")
    parser.add_argument("--lib", type=name_list, default=None,
                        help="symbolic candidates, comma-separated (default: the whole library)")
    parser.add_argument("--symbolic-steps", type=int_range(0), default=50,
                        help="LBFGS steps on the affine params after fixing")
    parser.add_argument("--n-train", type=int_range(16), default=1000, help="training points (>= 16)")
    parser.add_argument("--n-test", type=int_range(1), default=1000, help="test points")
    parser.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0, help="seed of the data and the init")
    parser.add_argument("--threads", type=int_range(0), default=1,
                        help="torch CPU threads (tiny models run fastest on 1; 0 keeps torch's default)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH", help="write the network figure (PNG) there")
    parser.add_argument("--force", action="store_true", help="overwrite existing --plot / --out files")
    return parser


def check_toy_arguments(args: argparse.Namespace) -> None:
    """What the parser cannot see alone, before any work: ``--width`` fits ``--function``, the
    ``--lib`` names exist, the ``--plot`` file can be written (``--force`` to overwrite).
    Raises ValueError (one line)."""
    n_var = TOY_FUNCTIONS[args.function][0]
    width = args.width or [n_var, 5, 1]
    if len(width) < 2 or width[0] != n_var or width[-1] != 1:
        raise ValueError(f"--width must start with {n_var} (inputs of {args.function!r}) and end with 1, got {width}")
    if args.lib is not None and not args.no_symbolic:
        from .symbolic import SYMBOLIC_LIB

        unknown = [n for n in args.lib if n not in SYMBOLIC_LIB]
        if unknown or not args.lib:
            raise ValueError(f"--lib: unknown symbolic function(s) {unknown}; choose from {', '.join(SYMBOLIC_LIB)}")
    if args.out is not None and not args.scaling:
        raise ValueError("--out goes with --scaling")
    png = _png_beside(args.out) if args.out is not None else None
    check_outputs([("--plot", args.plot), ("--out", args.out), ("--out's figure", png)],
                  force=getattr(args, "force", False),
                  suffixes={"--plot": IMAGE_SUFFIXES, "--out": (".json",), "--out's figure": IMAGE_SUFFIXES})
    # float64, full-batch LBFGS: per layer the bases of every training row with their order-by-order
    # tables (k + 2, k = 3) kept for backward; parameters with gradients and LBFGS's 2 x 10 history vectors
    G, k = max(_grids_and_steps(args)[0] + [args.prune_grid]), 3
    pairs = list(zip(width[:-1], width[1:]))
    per_row = sum(i * (G + 2 * k + 1) * (k + 2) + i + o for i, o in pairs)
    params = sum(i * o * (G + k + 2) for i, o in pairs)
    check_memory(8 * (max(args.n_train, args.n_test) * per_row + 24 * params),
                 f"KAN({width}) at G={G} on {max(args.n_train, args.n_test)} points",
                 hint="choose fewer --n-train/--n-test points, smaller --grids or --width")


def format_formula(expr, digits: int = 4) -> str:
    """``expr`` (sympy) as text, its numbers rounded to ``digits`` significant digits.

    Every float is rounded to ``digits`` significant digits (``0.996339797973633*x_2**2`` ->
    ``0.9963*x_2**2``; a small coefficient stays: ``1.235e-5*sin(...)``), one that is then an
    integer is printed as one (``1.0*sin(x)`` -> ``sin(x)``), and in a sum a constant below
    ``10**-digits`` of the largest coefficient of the sum's other terms is dropped, as rounding
    the sum to ``digits`` significant digits would (``sin(3.141*x_1 + 0.0001112)`` ->
    ``sin(3.141*x_1)``). A small term that is not a constant is kept.
    """
    import sympy

    def num(f):
        text = f"{float(f):.{digits}g}"  # decimal rounding (sympy's Float(f, digits) rounds in binary)
        r = float(text)
        return sympy.Integer(int(r)) if r.is_integer() and abs(r) < 10**digits else sympy.Float(text, digits)

    def rounded(e):
        return e.xreplace({f: num(f) for f in e.atoms(sympy.Float)})

    def walk(e):
        if not e.args:
            return rounded(e) if e.is_Float else e
        args = [walk(a) for a in e.args]
        if e.is_Add:
            terms = [a for a in args if not a.is_Number]
            scale = max((abs(float(a.as_coeff_Mul()[0])) for a in terms), default=0.0)
            if terms and scale > 0:
                args = terms + [a for a in args if a.is_Number and abs(float(a)) >= scale * 10.0**-digits]
        return rounded(e.func(*args))  # (rebuilding may multiply numbers out: round again)

    return sympy.sstr(walk(expr))


def _rmse(model, x, y) -> float:
    with torch.no_grad():
        return float(torch.sqrt(torch.mean((model(x) - y) ** 2)))


def _sqrt_median_sq(model, x, y) -> float:
    """sqrt of the median squared error (the paper's fig. 2.3 also reports this)."""
    with torch.no_grad():
        return float(torch.sqrt(torch.median((model(x) - y) ** 2)))


#: The grids of the paper's scaling experiment (Liu et al. 2024, fig. 2.3).
SCALING_GRIDS = (3, 5, 10, 20, 50, 100, 200, 500, 1000)


def scaling_slopes(curve: List[dict]) -> dict:
    """Least-squares slopes of log(error) against log(G) over the grids up to the one with the
    lowest test RMSE (past it the model interpolates its training set and the test error
    stops falling). ``curve``: the per-grid records of :func:`toy_workflow`. Returns
    ``{"grids": [...], "train_rmse": s, "test_rmse": s, "test_sqrt_median_sq": s}``."""
    best = min(range(len(curve)), key=lambda i: curve[i]["test_rmse"])
    pts = curve[: best + 1] if best >= 1 else curve
    out = {"grids": [p["grid"] for p in pts]}
    if len(pts) < 2:
        return {**out, "train_rmse": float("nan"), "test_rmse": float("nan"), "test_sqrt_median_sq": float("nan")}
    lg = torch.log(torch.tensor([float(p["grid"]) for p in pts], dtype=torch.float64))
    for key in ("train_rmse", "test_rmse", "test_sqrt_median_sq"):
        le = torch.log(torch.tensor([p[key] for p in pts], dtype=torch.float64))
        lc = lg - lg.mean()
        out[key] = float((lc * (le - le.mean())).sum() / (lc * lc).sum())
    return out


def _png_beside(path: Path) -> Path:
    return Path(path).with_suffix(".png")


def _grids_and_steps(args: argparse.Namespace) -> Tuple[List[int], int]:
    """The grids and LBFGS steps per grid of a run: as given, else the defaults (--scaling's own)."""
    grids = list(args.grids) if args.grids else list(SCALING_GRIDS if args.scaling else (3, 5, 10, 20))
    steps = args.steps if args.steps is not None else (200 if args.scaling else 50)
    return grids, steps


def _write_scaling(args, curve, slopes, widths, seconds, steps) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = {
        "meta": {"command": " ".join(["kanfast", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "machine": provenance.machine(torch.device("cpu")), "versions": provenance.versions(),
                 "git": provenance.git_commit(), "seconds": seconds, "function": args.function, "widths": widths,
                 "n_train": args.n_train, "n_test": args.n_test, "seed": args.seed, "steps_per_grid": steps,
                 "dtype": "float64", "backend": "torch"},
        "curve": curve,
        "slopes": slopes,
    }
    with open_output(args.out, args.force) as fh:
        json.dump(record, fh, indent=1)
    g = [p["grid"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.loglog(g, [p["train_rmse"] for p in curve], "o-", label="train RMSE")
    ax.loglog(g, [p["test_rmse"] for p in curve], "s-", label="test RMSE")
    ax.loglog(g, [p["test_sqrt_median_sq"] for p in curve], "^-", label="test sqrt(median sq. error)")
    ref = curve[0]["test_rmse"]
    ax.loglog(g, [ref * (gi / g[0]) ** -4 for gi in g], "k--", lw=1, label="G^-4 (paper)")
    ax.loglog(g, [ref * (gi / g[0]) ** -3 for gi in g], "k:", lw=1, label="G^-3")
    ax.set_xlabel("grid size G (intervals)")
    ax.set_ylabel("error")
    ax.set_title(f"KAN {widths} on {TOY_FUNCTIONS[args.function][2]}\nslope (test RMSE, G <= {slopes['grids'][-1]}): "
                 f"{slopes['test_rmse']:.2f}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with open_output(_png_beside(args.out), args.force, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def run_toy(args: argparse.Namespace) -> int:
    """``kanfast fit toy``: run :func:`toy_workflow`, printing as it goes. Returns 0."""
    toy_workflow(args)
    return 0


def toy_workflow(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Run the workflow described in the module docstring.

    Args:
        args: the namespace of a parser built with :func:`add_toy_arguments`.
        log: line printer.

    Returns:
        ``{"widths": [...] after pruning, "rmse": {grid: (train, test)},
        "choices": {(l, i, j): name}, "formula": sympy expr or None,
        "formula_rmse": float or None, "plot": path or None}``.
    """
    from .layer import KAN
    from .symbolic import auto_symbolic, symbolic_formula
    from .workflow import fit_lbfgs

    grids, steps = _grids_and_steps(args)
    symbolic = not (args.no_symbolic or args.scaling)
    if steps < 0 or args.reg_steps < 0 or args.symbolic_steps < 0:
        raise ValueError("step counts must be >= 0")
    check_toy_arguments(args)
    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    n_var, _, text = TOY_FUNCTIONS[args.function]
    width = args.width or [n_var, 5, 1]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = make_dataset(args.function, args.n_train, gen)
    xt, yt = make_dataset(args.function, args.n_test, gen)
    log(f"target f = {text}; {args.n_train} train / {args.n_test} test points on [-1, 1]^{n_var}")

    t0 = time.perf_counter()
    start_grid = grids[0] if args.no_prune else args.prune_grid
    model = KAN(width, grid_size=start_grid, dtype=torch.float64, backend="torch")
    if not args.no_prune:
        for r in range(args.prune_rounds):
            before = [l.out_features for l in model.layers]
            fit_lbfgs(model, x, y, steps=args.reg_steps, lamb=args.lamb, lamb_l1=args.lamb_l1,
                      lamb_entropy=args.lamb_entropy)
            model = model.prune(x, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
            after = [l.out_features for l in model.layers]
            widths = [width[0]] + after
            log(f"prune round {r + 1}: width {[width[0]] + before} -> {widths} "
                f"(train RMSE before retraining {_rmse(model, x, y):.3e})")
            if after == before or all(w == 1 for w in after[:-1]):
                break
    widths = [model.layers[0].in_features] + [l.out_features for l in model.layers]

    rmse, curve = {}, []
    for g_i, g in enumerate(grids):
        t_g = time.perf_counter()
        if g != model.grid_size:
            model.extend_grid(g, x)
        fit_lbfgs(model, x, y, steps=steps, update_grid_every=5 if g_i == 0 else None,
                  stop_grid_update_step=steps // 2)
        rmse[g] = (_rmse(model, x, y), _rmse(model, xt, yt))
        curve.append({"grid": g, "train_rmse": rmse[g][0], "test_rmse": rmse[g][1],
                      "test_sqrt_median_sq": _sqrt_median_sq(model, xt, yt), "seconds": time.perf_counter() - t_g})
        log(f"grid {g:3d}: train RMSE {rmse[g][0]:.3e}  test RMSE {rmse[g][1]:.3e}  "
            f"test sqrt(median sq. err.) {curve[-1]['test_sqrt_median_sq']:.3e}")

    result = {"widths": widths, "rmse": rmse, "choices": {}, "formula": None, "formula_rmse": None,
              "plot": None, "curve": curve, "slopes": None}
    if args.scaling:
        result["slopes"] = scaling_slopes(curve)
        sl = result["slopes"]
        log(f"fitted slopes over G = {sl['grids'][0]}..{sl['grids'][-1]} (up to the lowest test RMSE): "
            f"train RMSE ~ G^{sl['train_rmse']:.2f}, test RMSE ~ G^{sl['test_rmse']:.2f}, "
            f"test sqrt(median sq. err.) ~ G^{sl['test_sqrt_median_sq']:.2f} "
            f"(paper, fig. 2.3: G^-4 for sqrt(median), G^-3 for the mean)")
        if args.out:
            _write_scaling(args, curve, sl, widths, time.perf_counter() - t0, steps)
            log(f"wrote {args.out} and {_png_beside(args.out)}")
    if symbolic:
        chosen = auto_symbolic(model, x=x, lib=args.lib)
        for (l, i, j), fit in chosen.items():
            log(f"edge ({l},{i},{j}) -> {fit.name}  (R^2 = {fit.r2:.6f})")
        result["choices"] = {k: v.name for k, v in chosen.items()}
        if args.symbolic_steps:
            fit_lbfgs(model, x, y, steps=args.symbolic_steps)
        import sympy

        formula = symbolic_formula(model, var_names=[f"x_{k + 1}" for k in range(n_var)])[0]
        syms = sympy.symbols([f"x_{k + 1}" for k in range(n_var)], real=True)
        fn = sympy.lambdify(syms, formula, modules="numpy")
        pred = torch.as_tensor(fn(*[xt[:, k].numpy() for k in range(n_var)]), dtype=torch.float64)
        f_rmse = float(torch.sqrt(torch.mean((pred.reshape(-1) - yt.reshape(-1)) ** 2)))
        result["formula"] = formula
        result["formula_rmse"] = f_rmse
        log(f"formula: {format_formula(formula)}")
        log(f"formula test RMSE {f_rmse:.3e}")
    if args.plot:
        from .plot import plot

        plot(model, x, path=str(args.plot), in_vars=[f"$x_{{{k + 1}}}$" for k in range(n_var)], out_vars=["$f$"],
             title=f"KAN for {text}")
        result["plot"] = str(args.plot)
        log(f"wrote {args.plot}")
    log(f"total {time.perf_counter() - t0:.1f} s")
    return result


def main(argv: Optional[List[str]] = None) -> int:  # pragma: no cover - thin wrapper for manual runs
    parser = add_toy_arguments(argparse.ArgumentParser(prog="kanfast fit toy", description=__doc__.split("\n\n")[0]))
    return run_toy(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
