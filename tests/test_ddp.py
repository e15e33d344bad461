"""DistributedDataParallel over gloo, 2 processes on this machine (issue 5, item 5).

Each rank trains on its half of a global batch; the gradients must equal a
single-process run on the whole batch. Then ``update_grid_distributed`` with
unequal local batches must leave both ranks with identical knots and weights,
equal to a single-process ``KAN.update_grid`` on the concatenated samples.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kanfast
from kanfast import KAN

STEPS = 3
WIDTHS = [3, 6, 2]


def _data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = torch.randn(16, 2, generator=g, dtype=torch.float64)
    x_grid = torch.randn(23, 3, generator=g, dtype=torch.float64) * 1.5  # split 15 / 8 for update_grid
    return x, t, x_grid


def _model():
    torch.manual_seed(0)
    return KAN(WIDTHS, grid_size=4, backend="torch", dtype=torch.float64)


def _train(model, opt, x, t, steps):
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), t).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    return grads


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, t, x_grid = _data()
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        half = x.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        grads = _train(ddp, opt, x[sl], t[sl], STEPS)
        split = [15, 8][rank]
        local = x_grid[:split] if rank == 0 else x_grid[15:]
        kanfast.update_grid_distributed(ddp, local)
        after = _train(ddp, opt, x[sl], t[sl], 1)
        torch.save(
            {"grads": grads, "after": after, "state": {k: v.clone() for k, v in model.state_dict().items()}},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()  # no rank tears gloo down while the other still talks (else a sporadic SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_gloo_matches_single_process(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    # single process on the global batch
    x, t, x_grid = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = _train(model, opt, x, t, STEPS)
    model.update_grid(x_grid)
    after = _train(model, opt, x, t, 1)

    for r in range(world):
        for step_ref, step_r in zip(grads, res[r]["grads"]):
            for a, b in zip(step_ref, step_r):
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        for a, b in zip(after[0], res[r]["after"][0]):
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
    # ranks bitwise identical after the distributed grid update (and the step after it)
    for key, v0 in res[0]["state"].items():
        assert torch.equal(v0, res[1]["state"][key]), key
    for key, v in model.state_dict().items():
        torch.testing.assert_close(res[0]["state"][key], v, rtol=1e-8, atol=1e-10)
    assert not torch.equal(res[0]["state"]["layers.0.grid"], _model().layers[0].grid)  # knots did move


def test_update_grid_distributed_without_process_group_is_local_update():
    x = torch.randn(30, 3, dtype=torch.float64)
    a, b = _model(), _model()
    a.update_grid(x)
    grad_modes = []
    hook = b.layers[0].register_forward_pre_hook(lambda mod, args: grad_modes.append(torch.is_grad_enabled()))
    kanfast.update_grid_distributed(b, x.requires_grad_(True))
    hook.remove()
    assert grad_modes == [False]  # no autograd graph through the update's forward
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def _fsdp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
        from torch.distributed.fsdp import fully_shard

        torch.set_num_threads(1)
        x, t, x_grid = _data()
        model = _model()
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        local = x_grid[:15] if rank == 0 else x_grid[15:]
        raised = []
        for forward_first in (False, True):  # sharded; then unsharded views left by a forward
            if forward_first:
                model(local)
            try:
                kanfast.update_grid_distributed(model, local)
                raised.append(False)
            except TypeError as e:
                raised.append("FSDP" in str(e))
        # the documented recipe: full state dict -> unsharded replica -> update -> load back
        opts = StateDictOptions(full_state_dict=True)
        replica = _model()
        replica.load_state_dict(get_model_state_dict(model, options=opts))
        kanfast.update_grid_distributed(replica, local)
        set_model_state_dict(model, replica.state_dict(), options=opts)
        half = x.shape[0] // world
        y = model(x[rank * half : (rank + 1) * half])
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        torch.save({"raised": raised, "state": full, "y": y.detach()}, os.path.join(out_dir, f"fsdp{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fsdp2_grid_update_recipe(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) not available")
    world = 2
    mp.spawn(_fsdp_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"fsdp{r}.pt", weights_only=True) for r in range(world)]
    x, _, x_grid = _data()
    model = _model()
    model.update_grid(x_grid)
    y = model(x)
    for r in range(world):
        assert res[r]["raised"] == [True, True]
        for key, v in model.state_dict().items():
            torch.testing.assert_close(res[r]["state"][key], v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res[r]["y"], y[r * 8 : (r + 1) * 8], rtol=1e-10, atol=1e-12)
