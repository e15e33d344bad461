"""``kanfast validate``'s float32 hard grids: knots far from 0 against their spacing and very
fine grids (issue: the fast backends' closed form once took the knots as t_0 + j h)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kanfast.validate import TOLERANCES, default_cases, validate_case  # noqa: E402


def _hard(cases):
    return [c for c in cases if c.grid_range != (-1.0, 1.0) or c.grid_size >= 500]


def test_hard_grid_cases_are_listed():
    full = {(c.grid_range, c.grid_size, c.grid) for c in _hard(default_cases())}
    assert full == {((1e3, 1e3 + 1), 50, "uniform"), ((1e6, 1e6 + 1), 50, "uniform"),
                    ((-1.0, 1.0), 500, "uniform"), ((-1.0, 1.0), 1000, "rounded")}
    quick = {(c.grid_range, c.grid_size, c.grid) for c in _hard(default_cases(quick=True))}
    assert quick == {((1e6, 1e6 + 1), 50, "uniform"), ((-1.0, 1.0), 1000, "rounded")}
    assert all(not c.base for c in _hard(default_cases()))  # the spline term alone: its error shows


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hard_grids_match_in_float32(backend):
    cases = _hard(default_cases())
    if backend == "triton":
        from kanfast import triton_backend

        if not triton_backend.AVAILABLE:
            pytest.skip("triton not importable")
        cases = [c for c in cases if c.grid_size < 500]  # (the interpreter takes minutes at G = 1000)
    tol = TOLERANCES[torch.float32]
    for case in cases:
        errs = validate_case(case, backend, "cpu", torch.float32)
        bad = {n: rel for n, (_, rel) in errs.items() if not rel <= tol}
        assert not bad, f"{case.label()}: {bad}"
