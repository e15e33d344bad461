"""Per-call overhead of the small path, A/B in one process: two copies of kanfast (e.g. this
checkout and an older one exported under another package name), timed interleaved, min of many.

    python benchmarks/overhead_ab.py [PKG ...]      # default: kanfast
    # an older checkout as package kanfast_base (custom-op namespace renamed so both can load):
    git archive OLD kanfast | tar -x -C /tmp/base && mv /tmp/base/kanfast /tmp/base/kanfast_base
    sed -i 's/kanfast::/kanfast_base::/g; s/torch\\.ops\\.kanfast\\./torch.ops.kanfast_base./g' $(grep -rl kanfast:: /tmp/base)
    PYTHONPATH=/tmp/base python benchmarks/overhead_ab.py kanfast_base kanfast

One thread, float32, G = 5, k = 3. For each case: microseconds per call (min over rounds of the
mean of a block of calls; wall clock, and the calling thread's CPU time, steadier on a shared host), fwd+bwd (zero_grad, forward, sum, backward) and forward under no_grad,
plus an MLP (Linear + SiLU) of the same widths. Wall-clock numbers: say whether the host was loaded.
"""
import importlib
import sys
import time

import torch

torch.set_num_threads(1)
pkgs = sys.argv[1:] or ["kanfast"]
mods = {p: importlib.import_module(p + ".layer") for p in pkgs}
CASES = [("KAN([4,16,16,1]) b64", [4, 16, 16, 1], 64), ("KAN([2,5,1]) b1000", [2, 5, 1], 1000)]
ROUNDS, BLOCK = 30, 50


def mlp(widths):
    layers = []
    for i, o in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(i, o), torch.nn.SiLU()]
    return torch.nn.Sequential(*layers[:-1])


def timers(model, x):
    def fb():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def fwd():
        with torch.no_grad():
            model(x)

    return fb, fwd


for name, widths, batch in CASES:
    torch.manual_seed(0)
    x = torch.rand(batch, widths[0]) * 2 - 1
    models = {}
    for p, m in mods.items():
        torch.manual_seed(1)
        models[p] = m.KAN(widths, grid_size=5)
    models["MLP"] = mlp(widths)
    fns = {p: timers(mdl, x) for p, mdl in models.items()}
    best = {(p, w, c): float("inf") for p in fns for w in (0, 1) for c in (0, 1)}
    for _ in range(ROUNDS):
        for p, pair in fns.items():
            for w, fn in enumerate(pair):
                fn()
                t, c = time.perf_counter(), time.thread_time()
                for _ in range(BLOCK):
                    fn()
                c, t = time.thread_time() - c, time.perf_counter() - t
                best[p, w, 0] = min(best[p, w, 0], t / BLOCK * 1e6)
                best[p, w, 1] = min(best[p, w, 1], c / BLOCK * 1e6)
    print(name, "(us per call, min over rounds: wall / this thread's CPU time)")
    for p in fns:
        print(f"  {p:14s} fwd+bwd {best[p, 0, 0]:8.1f} / {best[p, 0, 1]:8.1f}   "
              f"fwd(no_grad) {best[p, 1, 0]:8.1f} / {best[p, 1, 1]:8.1f}")
