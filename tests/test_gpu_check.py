"""The GPU window's script runs end to end in its CPU dry run (issue 15, item 6): from a plain copy of
the checkout (no .git, kanfast not installed in its environment), Triton's interpreter, tiny shapes.
An import or plumbing break fails here, not in the window.

The dry run times nothing that means anything; what is checked is that every phase ran, that its
checks passed (they compare the kernels with the float64 reference), that every record parses and
carries the provenance fields, and that the speed model's hook (a stand-in gpu_model.py with the
interface benchmarks/gpu_model.py has) is run with the target shape and compared.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from test_install import clean_env, copy_checkout, make_env

# a stand-in for benchmarks/gpu_model.py: checks the arguments it is given and writes modelled times
FAKE_MODEL = r'''
import argparse, json
p = argparse.ArgumentParser()
for a in ("--batch", "--in", "--out", "--grid", "--order"):
    p.add_argument(a, type=int, required=True)
p.add_argument("--dtype", required=True)
p.add_argument("--json", required=True)
a = p.parse_args()
assert (a.batch, getattr(a, "in"), a.out, a.grid, a.order, a.dtype) == (65536, 1024, 1024, 5, 3, "bf16"), a
json.dump({"kernels": {"forward": {"modelled_ms": 5.0}, "grad_x": {"modelled_ms": 4.0},
                       "grad_W": {"modelled_ms": 20.0}, "fwd+bwd": {"modelled_ms": 29.0}}}, open(a.json, "w"))
'''


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu_check")
    src = copy_checkout(base / "kanfast")
    (src / "benchmarks" / "gpu_model.py").write_text(FAKE_MODEL)
    py = make_env(base / "env")
    out = base / "out"
    env = clean_env()
    env.update(OUT=str(out), PYTHON=str(py), KANFAST_COMMIT="0123abc", GPU_CHECK_MODEL="1")
    r = subprocess.run(["bash", str(src / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=base, env=env,
                       capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()] \
        if (out / "gpu_check.jsonl").exists() else []
    return r, records, out, src


def test_dry_run_passes_every_phase(dry_run):
    r, records, out, src = dry_run
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "not installed; importing this plain checkout" in r.stdout
    assert {rec["phase"] for rec in records} == {"1", "2", "3", "compare"}
    assert not [rec for rec in records if rec.get("ok") is False]
    assert len(list(out.iterdir())) <= 8
    assert (out / "gpu_check.log").read_text().count("phase 1") > 0


def test_records_carry_provenance(dry_run):
    _, records, _, src = dry_run
    assert records
    for rec in records:
        for key in ("gpu", "versions", "date", "command", "git", "kanfast_file"):
            assert rec.get(key) is not None, (key, rec)
        assert rec["git"]["commit"] == "0123abc"  # the copy has no .git: KANFAST_COMMIT
        assert rec["kanfast_file"].startswith(str(src)), rec["kanfast_file"]
        assert "gpu_check.sh --dry-run" in rec["command"]
        assert set(rec["versions"]) >= {"python", "torch", "triton"}


def test_phase1_checks_and_times_every_kernel(dry_run):
    _, records, _, _ = dry_run
    p1 = [rec for rec in records if rec["phase"] == "1"]
    checks = [rec for rec in p1 if rec["kind"] == "check"]
    names = " ".join(rec["check"] for rec in checks)
    for word in ("forward", "grad_x", "grad_coef", "grad_base_weight", "exactly 0", "bit-identical"):
        assert word in names, word
    assert all(rec["ok"] for rec in checks)
    timed = {rec["kernel"]: rec for rec in p1 if rec["kind"] == "timing"}
    assert set(timed) == {"forward", "grad_x", "grad_W", "fwd+bwd"}
    for name, rec in timed.items():
        assert rec["status"] == "ok" and rec["ms"] > 0 and rec["tflops"] > 0, rec
        assert rec["ratio_to_gemm"] > 0, rec
    assert {rec["gemm"] for rec in p1 if rec["kind"] == "gemm"} == {"forward", "grad_x", "grad_W"}
    baselines = {rec["method"]: rec["status"] for rec in p1 if rec["kind"] == "baseline"}
    assert baselines == {"materialized eager": "ok", "materialized torch.compile": "ok"}, baselines


def test_phase2_sweep_ran_in_shards(dry_run):
    _, records, _, _ = dry_run
    p2 = [rec for rec in records if rec["phase"] == "2"]
    shards = {rec["shard"] for rec in p2 if rec["kind"] == "start"}
    assert shards == {"0/2", "1/2"}
    checks = [rec for rec in p2 if rec["kind"] == "check"]
    assert len(checks) == 2 and all(rec["ok"] for rec in checks)
    assert {rec["knots"] for rec in checks} == {"uniform", "nonuniform"}
    for rec in checks:
        assert rec["uniform_detected"] == (rec["knots"] == "uniform")
        assert rec["deterministic"] and rec["nonfinite_rows"]["other_rows_bit_identical"]


def test_model_compared_with_measured(dry_run):
    r, records, _, _ = dry_run
    cmp = {rec["kernel"]: rec for rec in records if rec["kind"] == "model_compare"}
    assert set(cmp) == {"forward", "grad_x", "grad_W", "fwd+bwd"}
    assert cmp["grad_W"]["modelled_ms"] == 20.0 and cmp["grad_W"]["measured_ms"] > 0
    assert "measured/modelled" in r.stdout
