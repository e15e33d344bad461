"""``kanfast fit digits``: KAN([64, 32, 10]) against an MLP on scikit-learn's
bundled handwritten digits (1797 8x8 images, no download).

The images are read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``,
found with ``importlib.util.find_spec``, which does not run the package) and split by
:func:`stratified_split`, scikit-learn's ``train_test_split(..., stratify=y)`` in numpy:
importing ``sklearn.datasets`` and ``sklearn.model_selection`` (``sklearn.base``,
``scipy.stats``, ...) took about as long as training both models. Same arrays, same split
(``tests/test_tasks.py`` compares both with scikit-learn's); ``load_digits()`` when the file
is not where it is expected.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import math
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cli_checks import check_memory, float_range, int_range
from .layer import BACKENDS

__all__ = ["load_digits_split", "load_digits_arrays", "stratified_split", "train_classifier", "run_digits",
           "add_digits_arguments", "check_digits_arguments", "DIGITS_TRAIN_ROWS"]

#: training rows of the split (1797 images, a quarter held out)
DIGITS_TRAIN_ROWS = 1347


def _digits_file() -> Optional[Path]:
    """Path of scikit-learn's ``datasets/data/digits.csv.gz``, or None (package or file missing);
    the package is located, not imported."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def load_digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """``(data, target)`` of scikit-learn's digits: ``(1797, 64)`` float64 pixel counts 0..16 and
    ``(1797,)`` int64 labels 0..9, as ``sklearn.datasets.load_digits()`` gives them. Read from the
    file scikit-learn ships (as its loader does: ``np.loadtxt`` of the gzipped CSV, the label in
    the last column), falling back to ``load_digits()`` where the file is not found.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    path = _digits_file()
    if path is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        table = np.loadtxt(fh, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's ``sklearn.utils.extmath._approximate_mode`` (same draws from ``rng``):
    per-class counts summing to ``n_draws``, proportional to ``class_counts``, the remainders
    handed out largest first with ties broken at random."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def stratified_split(y: np.ndarray, test_size: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` row indices of ``y`` (1-D labels): scikit-learn's
    ``train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y)``
    (``StratifiedShuffleSplit``'s first split, the same random draws in the same order, so the
    same indices) without importing scikit-learn. ``ceil(test_size * n)`` test rows.

    Raises:
        ValueError: ``test_size`` not in (0, 1), a class with fewer than 2 members, or fewer
            train or test rows than classes.
    """
    y = np.asarray(y)
    n = y.shape[0]
    if not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}")
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    y_indices = y_indices.reshape(-1)
    if class_counts.min() < 2:
        raise ValueError(f"every class needs at least 2 members; classes {classes[class_counts < 2].tolist()} have 1")
    if n_train < len(classes) or n_test < len(classes):
        raise ValueError(f"{n_train} train / {n_test} test rows for {len(classes)} classes: "
                         "need at least one per class")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train, test = [], []
    for i in range(len(classes)):
        members = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(members[: n_i[i]])
        test.extend(members[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def load_digits_split(test_size: float = 0.25, seed: int = 0):
    """(x_train, y_train, x_test, y_test) as float32/int64 tensors, pixels scaled to [-1, 1];
    the split stratified by class (:func:`stratified_split`)."""
    data, target = load_digits_arrays()
    x = torch.tensor(data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.tensor(target, dtype=torch.int64)
    idx_tr, idx_te = (torch.from_numpy(np.asarray(i, dtype=np.int64))
                      for i in stratified_split(target, test_size, seed))
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


def train_classifier(model: nn.Module, data, epochs: int, lr: float, batch_size: int = 64, seed: int = 0,
                     progress: bool = False, name: Optional[str] = None) -> Dict[str, float]:
    """Adam + cross-entropy; returns test accuracy, final train loss and wall time (s).
    ``name`` labels the progress bar (default: the model's class name)."""
    from tqdm import tqdm

    x_tr, y_tr, x_te, y_te = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(epochs), desc=name or type(model).__name__, disable=not progress, leave=False):
        model.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for s in range(0, len(perm), batch_size):
            b = perm[s : s + batch_size]
            loss = F.cross_entropy(model(x_tr[b]), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(-1) == y_te).float().mean().item()
    return {"test_accuracy": acc, "train_loss": loss.item(), "seconds": time.perf_counter() - t0}


def add_digits_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kanfast fit digits`` (each checked by its argparse type)."""
    parser.add_argument("--epochs", type=int_range(1), default=30, help="training epochs of each model")
    parser.add_argument("--lr", type=float_range(0, min_inclusive=False), default=1e-2,
                        help="Adam learning rate of the KAN (the MLP gets 0.3x)")
    parser.add_argument("--batch-size", type=int_range(1), default=64, help="minibatch size")
    parser.add_argument("--grid-size", type=int_range(1), default=5, help="G, grid intervals per input")
    parser.add_argument("--spline-order", type=int_range(0), default=3, help="k, the B-spline order")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="kanfast backend of the KAN (triton needs CUDA; this task runs on the CPU)")
    parser.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0, help="seed of the split, init and batches")
    parser.add_argument("--threads", type=int_range(0), default=1,
                        help="torch CPU threads (small models run fastest on 1; 0 keeps torch's default)")


def check_digits_arguments(args: argparse.Namespace) -> None:
    """What the parser cannot see alone, before any work: the backend runs here, and the
    largest tensors of the run (the KAN's bases of a full minibatch, kept for backward) fit in
    memory. Raises ValueError (one line)."""
    if args.backend == "triton":
        raise ValueError("--backend triton needs CUDA tensors; this task trains on the CPU (there the triton "
                         "backend is Triton's interpreter, far too slow to train): use auto or torch")
    rows = min(args.batch_size, DIGITS_TRAIN_ROWS)
    nb = args.grid_size + args.spline_order
    widths = [(64, 32), (32, 10)]
    params = sum(i * o * (nb + 2) for i, o in widths)
    # per layer: bases (rows, in, G+k) and their order-by-order tables (k+2 of them) kept for backward
    acts = sum(rows * i * (nb + args.spline_order + 1) * (args.spline_order + 2) + rows * (i + o) for i, o in widths)
    check_memory(4 * (4 * params + acts), f"KAN([64, 32, 10]) at G={args.grid_size} k={args.spline_order}, "
                 f"minibatch {rows}", hint="choose a smaller --grid-size or --batch-size")


def run_digits(args) -> int:
    """``kanfast fit digits``: train both models, print their sizes, accuracy and time. Returns 0."""
    from .layer import KAN

    check_digits_arguments(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_digits_split(seed=args.seed)
    kan = KAN([64, 32, 10], grid_size=args.grid_size, spline_order=args.spline_order, backend=args.backend)
    n_kan = sum(p.numel() for p in kan.parameters())
    hidden = max(1, round((n_kan - 10) / (64 + 1 + 10)))  # MLP 64-h-10 with about as many parameters
    torch.manual_seed(args.seed)
    mlp = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, 10))
    n_mlp = sum(p.numel() for p in mlp.parameters())
    print(f"digits: {len(data[1])} train / {len(data[3])} test images, 64 features, 10 classes; threads={torch.get_num_threads()}")
    res_kan = train_classifier(kan, data, args.epochs, args.lr, args.batch_size, args.seed, progress=True, name="KAN")
    print(f"KAN([64, 32, 10]) G={args.grid_size} k={args.spline_order}: {n_kan} params, test accuracy {res_kan['test_accuracy']:.4f}, {res_kan['seconds']:.1f} s")
    res_mlp = train_classifier(mlp, data, args.epochs, args.lr * 0.3, args.batch_size, args.seed, progress=True,
                               name="MLP")
    print(f"MLP([64, {hidden}, 10]) SiLU: {n_mlp} params, test accuracy {res_mlp['test_accuracy']:.4f}, {res_mlp['seconds']:.1f} s")
    return 0
