"""pytest-benchmark microbenchmarks of the KAN backends.

    pytest benchmarks/ --benchmark-only                  # all
    pytest benchmarks/ --benchmark-only -k "torch and fwd_bwd"

Forward (no grad), backward alone (on a retained graph) and forward+backward,
per backend, on a few CPU-sized shapes (triton only on CUDA). Not collected by
the default test run (``testpaths = tests``); no timing is asserted.
"""

from __future__ import annotations

import pytest
import torch

from kanfast import FastKANLayer

from kanfast.benchmarks.baselines import MaterializedKAN

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "reference"] + (["triton"] if DEVICE == "cuda" else [])
#: (batch, in, out, G, k)
SHAPES = [(1024, 64, 64, 5, 3), (1024, 128, 128, 20, 3), (256, 256, 256, 50, 3)]


def _ids(shape):
    return "b{}_i{}_o{}_G{}_k{}".format(*shape)


def _setup(shape, backend):
    b, nin, nout, G, k = shape
    torch.manual_seed(0)
    layer = FastKANLayer(nin, nout, grid_size=G, spline_order=k, device=DEVICE)
    if backend == "materialized":
        layer = MaterializedKAN.from_layer(layer)
    else:
        layer.backend = backend
    x = torch.rand(b, nin, device=DEVICE) * 2 - 1
    gy = torch.randn(b, nout, device=DEVICE)
    return layer, x, gy


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("backend", BACKENDS + ["materialized"])
def test_fwd(benchmark, backend, shape):
    layer, x, _ = _setup(shape, backend)

    def fwd():
        with torch.no_grad():
            y = layer(x)
        _sync()
        return y

    y = benchmark(fwd)
    assert y.shape == (shape[0], shape[2])


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("backend", BACKENDS + ["materialized"])
def test_bwd(benchmark, backend, shape):
    layer, x, gy = _setup(shape, backend)
    xg = x.requires_grad_(True)
    y = layer(xg)

    def bwd():
        y.backward(gy, retain_graph=True)
        _sync()

    benchmark(bwd)
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("backend", BACKENDS + ["materialized"])
def test_fwd_bwd(benchmark, backend, shape):
    layer, x, gy = _setup(shape, backend)

    def step():
        for p in layer.parameters():
            p.grad = None
        xg = x.detach().requires_grad_(True)
        layer(xg).backward(gy)
        _sync()
        return xg.grad

    g = benchmark(step)
    assert g.shape == x.shape
