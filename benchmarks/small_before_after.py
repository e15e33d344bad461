"""Before/after timing of the small-model table of issue 16 (KAN models and single layers, G = 5, k = 3,
float32): median wall-clock and process CPU time per call, fwd+bwd and forward under no_grad.

    python benchmarks/small_before_after.py THREADS REPEATS
    PYTHONPATH=/path/to/an/older/checkout python benchmarks/small_before_after.py 1 40   # the same on older code

Prints one line per case (the first line names the kanfast it imported). Results: results/small_before_after_t1.txt.
"""
import sys, time, statistics, torch
import kanfast
from kanfast import KAN
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
torch.manual_seed(0)
cases = [("KAN([2,5,1])", [2,5,1], 1000), ("KAN([4,16,16,1])", [4,16,16,1], 64), ("KAN([64,32,10])", [64,32,10], 256),
         ("KAN([784,64,10])", [784,64,10], 128), ("64->64", [64,64], 1024), ("256->256", [256,256], 4096)]
def med(fn, n):
    fn(); fn()
    w, c = [], []
    for _ in range(n):
        t = time.perf_counter(); p = time.process_time(); fn(); c.append(time.process_time() - p); w.append(time.perf_counter() - t)
    return statistics.median(w) * 1e3, statistics.median(c) * 1e3
print(kanfast.__file__, "threads", torch.get_num_threads())
for name, wd, b in cases:
    m = KAN(wd, grid_size=5)
    x = torch.rand(b, wd[0]) * 2 - 1
    def fb():
        m.zero_grad(set_to_none=True); m(x).sum().backward()
    def f():
        with torch.no_grad(): m(x)
    n = reps if b * wd[0] < 100000 else max(7, reps // 5)
    a, c = med(fb, n), med(f, n)
    print(f"{name:18s} b{b:5d}  fwd+bwd wall {a[0]:9.3f} cpu {a[1]:9.3f} ms | fwd(no_grad) wall {c[0]:9.3f} cpu {c[1]:9.3f} ms", flush=True)
