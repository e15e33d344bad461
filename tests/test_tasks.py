"""``kanfast fit digits``'s data without importing scikit-learn: the same arrays as
``sklearn.datasets.load_digits()`` and the same split as ``train_test_split(..., stratify=y)``."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from kanfast import tasks


def test_digits_arrays_match_load_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    data, target = tasks.load_digits_arrays()
    ref = datasets.load_digits()
    assert data.dtype == ref.data.dtype and target.dtype == np.int64
    assert np.array_equal(data, ref.data) and np.array_equal(target, ref.target)
    assert data.shape == (1797, 64) and set(target.tolist()) == set(range(10))


def test_digits_fall_back_to_load_digits_without_the_file(monkeypatch):
    datasets = pytest.importorskip("sklearn.datasets")
    monkeypatch.setattr(tasks, "_digits_file", lambda: None)
    data, target = tasks.load_digits_arrays()
    ref = datasets.load_digits()
    assert np.array_equal(data, ref.data) and np.array_equal(target, ref.target)


@pytest.mark.parametrize("seed", [0, 1, 7, 2**32 - 1])
@pytest.mark.parametrize("test_size", [0.25, 0.1, 0.5, 0.333])
def test_stratified_split_is_train_test_split(seed, test_size):
    ms = pytest.importorskip("sklearn.model_selection")
    _, target = tasks.load_digits_arrays()
    rows = np.arange(len(target))
    ref_tr, ref_te = ms.train_test_split(rows, test_size=test_size, random_state=seed, stratify=target)
    tr, te = tasks.stratified_split(target, test_size, seed)
    assert np.array_equal(tr, ref_tr) and np.array_equal(te, ref_te)


@pytest.mark.parametrize("seed", [0, 3])
def test_stratified_split_ties_and_uneven_classes(seed):
    """Labels whose remainders tie (the random tie-break of _approximate_mode) and classes of 2."""
    ms = pytest.importorskip("sklearn.model_selection")
    y = np.array([0] * 7 + [1] * 7 + [2] * 7 + [3] * 2 + [5] * 11 + [9] * 3)
    rng = np.random.default_rng(seed)
    y = rng.permutation(y)
    for test_size in (0.2, 0.3, 0.5):
        ref = ms.train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y)
        got = tasks.stratified_split(y, test_size, seed)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref)), test_size


def test_stratified_split_errors():
    y = np.array([0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="at least 2 members"):
        tasks.stratified_split(y, 0.5, 0)
    with pytest.raises(ValueError, match="test_size"):
        tasks.stratified_split(np.array([0, 0, 1, 1]), 1.0, 0)
    with pytest.raises(ValueError, match="per class"):
        tasks.stratified_split(np.array([0, 0, 1, 1, 2, 2]), 0.1, 0)


def test_load_digits_split_shapes_and_scaling():
    pytest.importorskip("sklearn")
    x_tr, y_tr, x_te, y_te = tasks.load_digits_split(seed=0)
    assert x_tr.shape == (tasks.DIGITS_TRAIN_ROWS, 64) and x_te.shape == (1797 - tasks.DIGITS_TRAIN_ROWS, 64)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) == -1.0 and float(x_tr.max()) == 1.0
    data, target = tasks.load_digits_arrays()
    tr, te = tasks.stratified_split(target, 0.25, 0)
    assert torch.equal(x_te, torch.tensor(data[te], dtype=torch.float32) / 8.0 - 1.0)
    assert torch.equal(y_tr, torch.from_numpy(target[tr]))


def test_fit_digits_does_not_import_sklearn():
    """Where the data file is found, the command reads it without running scikit-learn."""
    pytest.importorskip("sklearn")
    code = ("import sys\n"
            "from kanfast.cli import main\n"
            "assert main(['fit', 'digits', '--epochs', '1']) == 0\n"
            "print('SKLEARN', 'sklearn' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "SKLEARN False" in res.stdout, res.stdout
