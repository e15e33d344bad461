"""Static speed model of the Triton backend's wide-layer path (or, for comparison, the fused kernels).

    python3 benchmarks/wide_model.py --mode wide --batch 65536 --in 1024 --out 1024 --grid 5 --order 3 --json PATH

A MODEL, not a measurement, and no GPU is needed: it runs ``benchmarks/gpu_model.py``
(the static sm_90 model of the fused kernels: ahead-of-time compile, SASS instruction
counts, issue / L2 / HBM / tensor-core floors; that script must sit next to this one)
on the launchers of :mod:`kanfast.triton_backend` with the path forced by
``KANFAST_TRITON_WIDE``'s module setting. For the wide path:

* the basis-block kernels (``kanfast/kernels/basis_block.py``) are compiled from a
  private non-interpreted copy, like gpu_model's copy of the fused kernels;
* the chunk size is set to the whole batch (one chunk): the per-row work is the same
  as with L2-sized chunks, and gpu_model charges every tensor to HBM once anyway;
* the ``torch.mm`` calls are modelled as gpu_model models torch GEMMs (tensor-core
  time at its 790 TFLOP/s and the bytes they touch, FLOPs from the two operands).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from triton import knobs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import gpu_model as gm  # noqa: E402
except ImportError as e:  # pragma: no cover - the model script lives next to this one
    raise SystemExit(f"benchmarks/wide_model.py needs benchmarks/gpu_model.py next to it ({e})")

from kanfast import triton_backend as tb  # noqa: E402

def compiled_basis_module():
    with knobs.runtime.scope():
        knobs.runtime.interpret = False
        spec = importlib.util.spec_from_file_location("kanfast.kernels._basis_block_aot", tb._bmod.__file__)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("wide", "fused"), default="wide")
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--in", dest="nin", type=int, default=1024)
    ap.add_argument("--out", dest="nout", type=int, default=1024)
    ap.add_argument("--grid", type=int, default=5)
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    bmod = compiled_basis_module()
    tb._wide_kernels = lambda device: bmod
    tb._WIDE_MODE = a.mode
    if a.mode == "wide":
        tb._WIDE_CHUNK_ROWS_OVERRIDE = a.batch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    r = gm.run_model(a.batch, a.nin, a.nout, a.grid, a.order, dtype)
    r["path"] = a.mode
    r["wide_model_notes"] = __doc__
    k = r["kernels"]
    print(f"{a.mode}: batch {a.batch} in {a.nin} out {a.nout} G {a.grid} k {a.order} {a.dtype}: "
          f"fwd+bwd {k['fwd+bwd']['modelled_ms']:.2f} ms modelled, dense GEMMs {r['dense_gemm_ms']:.2f} ms, "
          f"{100 * r['fraction_of_dense_rate']:.1f}% of the dense rate")
    for ph in ("forward", "grad_x", "grad_W"):
        m = k[ph]
        print(f"  {ph}: {m['modelled_ms']:.3f} ms (kernels {m['kernel_ms']:.3f}, bound {m.get('bound')}, "
              f"regs {m.get('regs')}, spills {m.get('spills')}; torch ops {m['torch_ops']['modelled_ms']:.3f})")
    if a.json:
        a.json.write_text(json.dumps(r, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
