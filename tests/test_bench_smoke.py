"""Smoke test of the ``kanfast bench`` engine at a tiny size (no timing asserted),
and the materialized baseline against the layer it copies."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from kanfast import FastKANLayer
from kanfast.benchmarks import bench
from kanfast.benchmarks.baselines import MaterializedKAN, PeerStatus, make_peers, mlp


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--batch", "16", "--in", "4", "--out-features", "3", "--grid", "3,5", "-k", "2",
            "--repeats", "1", "--warmup", "0", "--peers", "none", "--no-progress", "--quiet",
            "--device", "cpu", "--out", str(tmp_path / "bench.json"), *extra]
    return parser.parse_args(argv)


def test_bench_writes_json_and_csv(tmp_path):
    args = _args(tmp_path, "--no-first-call", "--plot", str(tmp_path / "bench.png"))
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    meta = data["meta"]
    for key in ("date_utc", "command", "machine", "versions", "git", "dtype", "device", "shapes", "memory", "flops"):
        assert key in meta, key
    for key in ("cpu_model", "cpu_count", "torch_threads"):
        assert key in meta["machine"], key
    for key in ("python", "torch", "triton"):
        assert key in meta["versions"], key
    assert meta["shapes"] == [{"batch": 16, "in": 4, "out": 3, "G": g, "k": 2} for g in (3, 5)]
    assert len(data["floors"]) == 2 and all(f["fwd_bwd_ms"] > 0 for f in data["floors"])
    impls = {r["impl"] for r in data["results"]}
    assert {"kanfast-torch", "kanfast-reference", "materialized", "mlp"} <= impls
    for r in data["results"]:
        if r["impl"] == "kanfast-triton":
            assert r["status"] == "skipped"  # CPU run
            continue
        assert r["status"] == "ok", r
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_samples_per_s", "fwd_bwd_vs_mlp", "fwd_bwd_vs_materialized",
                    "fwd_bwd_gflops", "peak_extra_mb"):
            assert key in r, key
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        if r["kind"] == "kan":
            assert r["fwd_bwd_vs_floor"] > 0
            assert r["max_abs_diff_vs_materialized"] < 1e-5  # same parameters, float32
    csv_text = (tmp_path / "bench.csv").read_text().splitlines()
    assert csv_text[0].startswith("batch,in,out,G,k,impl") and any("dense-floor" in line for line in csv_text)
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert bench.run(_args(tmp_path, "--backends", "torch,cuda-magic")) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert bench.run(_args(tmp_path, "--peers", "nosuchkan")) == 2
    with pytest.raises(SystemExit):
        _args(tmp_path, "--batch", "x")


@pytest.mark.parametrize("k", [0, 1, 3])
def test_materialized_baseline_matches_layer(k):
    torch.manual_seed(0)
    layer = FastKANLayer(5, 4, grid_size=6, spline_order=k, dtype=torch.float64)
    base = MaterializedKAN.from_layer(layer)
    x = torch.rand(40, 5, dtype=torch.float64) * 2.4 - 1.2  # includes the extension region
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = layer(xa), base(xb)
    torch.testing.assert_close(yb, ya, rtol=0, atol=1e-12)
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=1e-11)
    for name in ("base_weight", "spline_weight", "spline_scaler"):
        torch.testing.assert_close(getattr(base, name).grad, getattr(layer, name).grad, rtol=0, atol=1e-11)


def test_mlp_and_peer_statuses():
    m = mlp(6, 2)
    assert m(torch.zeros(3, 6)).shape == (3, 2)
    with pytest.raises(ValueError, match="unknown peer"):
        make_peers(["nosuchkan"], 4, 3, 5, 3)
    for label, mod in make_peers(["flashkan", "inkan"], 4, 3, 5, 2):  # both are cubic-only
        assert isinstance(mod, PeerStatus) and mod.status in ("missing", "unsupported"), (label, mod)


# ----------------------------------------------------------------------------- the figure

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _texts(fig):
    import matplotlib.text

    return [t.get_text() for t in fig.findobj(matplotlib.text.Text)]


def test_replot_committed_json_draws_only_panels_with_data(tmp_path):
    """A G sweep at one batch: one row of panels (fwd+bwd, forward, memory), the floor as a dashed line in the time
    panels, kanfast drawn bolder than the peers, units on the axes, no placeholder panels."""
    png = tmp_path / "t2.png"
    fig = bench.plot_results(RESULTS / "target_t2.json", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 3 and all(ax.axison for ax in fig.axes)
    assert not any("single" in t for t in _texts(fig))
    time_axes = [ax for ax in fig.axes if "(ms)" in ax.get_ylabel()]
    assert len(time_axes) == 2 and "(MiB)" in fig.axes[2].get_ylabel()
    for ax in fig.axes:
        assert ax.get_xlabel().startswith("grid size G")
    for ax in time_axes:
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        floor = lines[bench.FLOOR_LABEL]
        assert floor.get_linestyle() == "--"
        assert list(floor.get_xdata()) == [5, 20, 50]  # one floor point per G of the run
        assert lines["kanfast-torch"].get_linewidth() > lines["flashkan"].get_linewidth()
        assert ax.get_yscale() == "log"  # 10 ms .. 10 s
    assert bench.FLOOR_LABEL not in [ln.get_label() for ln in fig.axes[2].get_lines()]  # no memory floor
    title = fig._suptitle.get_text()
    for part in ("batch=4096", "in=256", "float32", "2 threads", "AMD EPYC"):
        assert part in title, part
    # what is not drawn is said, with the reason
    assert any("not drawn" in t and "pykan" in t for t in _texts(fig))


def test_replot_batch_sweep_and_single_shape(tmp_path):
    fig = bench.plot_results(RESULTS / "batch_sweep_t2.json", tmp_path / "b.png")
    assert len(fig.axes) == 3 and fig.axes[0].get_xlabel().startswith("batch")
    assert fig.axes[0].get_xscale() == "log"
    # one shape: bars, the floor as a vertical reference line, kanfast's names in bold
    data = json.loads((RESULTS / "target_t2.json").read_text())
    rows = [r for r in data["results"] if r["G"] == 20]
    floors = [f for f in data["floors"] if f["G"] == 20]
    fig = bench._plot(rows, tmp_path / "one.png", floors, data["meta"])
    assert (tmp_path / "one.png").stat().st_size > 0
    assert len(fig.axes) == 3
    fb = fig.axes[0]
    assert [ln.get_label() for ln in fb.get_lines()] == [bench.FLOOR_LABEL]
    assert fb.get_lines()[0].get_xdata()[0] == pytest.approx(floors[0]["fwd_bwd_ms"])
    bold = {t.get_text() for t in fb.get_yticklabels() if t.get_fontweight() == "bold"}
    assert bold == {"kanfast-torch", "kanfast-reference"}


def test_replot_command_line(tmp_path, capsys):
    src = tmp_path / "run.json"
    src.write_text((RESULTS / "default_cpu.json").read_text())
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--replot", str(src)])) == 0  # PNG next to the JSON
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "run.csv").exists()  # nothing was run
    bad = tmp_path / "bad.json"
    bad.write_text('{"meta": {}}')
    assert bench.run(parser.parse_args(["--replot", str(bad), "--plot", str(tmp_path / "x.png")])) == 2
    assert "not a kanfast bench result" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ the named sweeps at tiny sizes
def _compile_is_identity(monkeypatch):
    """'+compile' rows without inductor's minutes: the harness's code path, an eager module."""
    from kanfast.benchmarks import baselines

    monkeypatch.setattr(baselines, "compile_module", lambda m: m)


def _check_ratios(row, ref_rows, floor=None):
    """Every ratio of a kanfast row is its recorded time over the recorded time it names."""
    mlp = next(r for r in ref_rows if r["impl"] == "mlp")
    assert row["fwd_vs_mlp"] == pytest.approx(row["fwd_ms"] / mlp["fwd_ms"])
    assert row["fwd_bwd_vs_mlp"] == pytest.approx(row["fwd_bwd_ms"] / mlp["fwd_bwd_ms"])
    peers = [r for r in ref_rows if r.get("fwd_bwd_ms") is not None and r["kind"] in ("baseline", "peer")]
    for key in ("fwd", "fwd_bwd"):
        if peers:
            best = min(peers, key=lambda r: r[f"{key}_ms"])
            assert row[f"best_peer_{key}"] == best["impl"]
            assert row[f"{key}_vs_best_peer"] == pytest.approx(row[f"{key}_ms"] / best[f"{key}_ms"])
        else:
            assert f"{key}_vs_best_peer" not in row
    if floor is not None:
        if floor["fwd_bwd_ms"] is None:
            assert row["fwd_bwd_vs_floor"] is None
        else:
            assert row["fwd_vs_floor"] == pytest.approx(row["fwd_ms"] / floor["fwd_ms"])
            assert row["fwd_bwd_vs_floor"] == pytest.approx(row["fwd_bwd_ms"] / floor["fwd_bwd_ms"])


def test_partial_results_are_kept_after_each_shape(tmp_path, monkeypatch):
    """A run stopped part-way leaves the shapes it measured in OUT.partial.json (meta.partial);
    a run that ends writes its outputs and removes the partial file."""
    real = bench._run_shape
    calls = []

    def second_shape_fails(*a, **kw):
        calls.append(a[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a stopped run
        return real(*a, **kw)

    monkeypatch.setattr(bench, "_run_shape", second_shape_fails)
    with pytest.raises(KeyboardInterrupt):
        bench.run(_args(tmp_path, "--no-first-call", "--no-memory"))
    assert not (tmp_path / "bench.json").exists()
    part = json.loads((tmp_path / "bench.partial.json").read_text())
    assert part["meta"]["partial"] is True
    assert {r["G"] for r in part["results"]} == {3} and [f["G"] for f in part["floors"]] == [3]
    assert any(r["impl"] == "kanfast-torch" and r["status"] == "ok" for r in part["results"])
    monkeypatch.setattr(bench, "_run_shape", real)
    assert bench.run(_args(tmp_path, "--no-first-call", "--no-memory", "--force")) == 0
    assert (tmp_path / "bench.json").exists() and not (tmp_path / "bench.partial.json").exists()


def test_a_shape_whose_cases_are_all_skipped_builds_no_layer(tmp_path, monkeypatch):
    """The layer (its construction is several times its parameters: the wide layer at G = 500 ran the
    sweep out of memory with every case skipped) is built only when a case uses it."""
    import kanfast

    args = _args(tmp_path, "--peers", "flashkan")
    labels = bench._case_labels(args, ["torch"], ["flashkan"])
    skip = {lb: "memory: test" for lb in labels}
    built = []
    real = kanfast.FastKANLayer

    def counting(*a, **kw):
        built.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(kanfast, "FastKANLayer", counting)
    cases, layer = bench._build_cases((16, 4, 3, 5, 2), args, torch.device("cpu"), torch.float32, ["torch"],
                                      ["flashkan"], skip)
    assert layer is None and built == []
    assert {c.label: c.status for c in cases} == {lb: "skipped" for lb in labels}
    rows, floor = bench._run_shape((16, 4, 3, 5, 2), args, torch.device("cpu"), torch.float32, ["torch"],
                                   ["flashkan"], lambda *a: None, bench._Plan({**skip, "floor": "memory: test"}, {}))
    assert built == [] and all(r["status"] == "skipped" for r in rows)
    del skip["kanfast-torch"]  # one case that uses it: built
    cases, layer = bench._build_cases((16, 4, 3, 5, 2), args, torch.device("cpu"), torch.float32, ["torch"],
                                      ["flashkan"], skip)
    assert layer is not None and len(built) == 1


def test_grid_sweep_structure_and_time_skips(tmp_path, monkeypatch):
    """``--sweep grid`` on two tiny layers and two G: per (layer, G) kanfast (its path recorded), the
    floor, the MLP, the baseline eager and '+compile'; with ``--max-step-s`` below every step, the
    baselines of the second G are skipped for time (the reason recorded) while kanfast and the floor
    are still timed; ratios are the recorded times' ratios; one panel row per layer."""
    _compile_is_identity(monkeypatch)
    monkeypatch.setitem(bench.SWEEPS["grid"], "grid_size", [3, 5])
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--sweep", "grid", "--layers", "16x4x3,8x3x3", "--peers", "none", "--repeats", "2",
                              "--warmup", "0", "--max-step-s", "1e-9", "--no-memory", "--no-first-call",
                              "--no-progress", "--quiet", "--device", "cpu", "--out", str(tmp_path / "g.json"),
                              "--plot", str(tmp_path / "g.png")])
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "g.json").read_text())
    meta = data["meta"]
    for key in ("date_utc", "machine", "versions", "git", "budget", "shapes"):
        assert key in meta, key
    assert meta["budget"]["max_step_s"] == 1e-9 and meta["budget"]["time_budget_s"] == 420.0
    assert [(s["batch"], s["in"], s["out"], s["G"]) for s in meta["shapes"]] == [
        (16, 4, 3, 3), (8, 3, 3, 3), (16, 4, 3, 5), (8, 3, 3, 5)]  # G-major
    rows = data["results"]
    for shape in meta["shapes"]:
        at = [r for r in rows if all(r[k] == shape[k] for k in ("batch", "in", "out", "G"))]
        floor = next(f for f in data["floors"] if all(f[k] == shape[k] for k in ("batch", "in", "out", "G")))
        assert floor["status"] == "ok" and floor["fwd_bwd_ms"] > 0 and floor["repeats"] >= 1
        assert [r["impl"] for r in at] == ["kanfast-torch", "materialized", "materialized+compile", "mlp"]
        kan = at[0]
        assert kan["status"] == "ok" and kan["path"] in ("sparse", "dense-block") and 1 <= kan["repeats"] <= 2
        assert kan["max_abs_diff_vs_materialized"] < 1e-5
        for r in at[1:3]:
            if shape["G"] == 3:  # nothing known yet: timed
                assert r["status"] == "ok" and r["fwd_bwd_ms"] > 0
            else:  # predicted from G = 3, over --max-step-s
                assert r["status"] == "skipped" and r["note"].startswith("time:") and "fwd_bwd_ms" not in r
        assert at[3]["status"] == "skipped" if shape["G"] == 5 else at[3]["status"] == "ok"
        if shape["G"] == 3:
            _check_ratios(kan, at, floor)
    csv_lines = (tmp_path / "g.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) + len(data["floors"])
    assert "path" in csv_lines[0].split(",") and "fwd_bwd_vs_best_peer" in csv_lines[0].split(",")
    fig = bench.plot_results(tmp_path / "g.json", tmp_path / "again.png")
    assert len(fig.axes) == 2 * 2  # two layers x (fwd+bwd, forward); no memory pass
    assert all(ax.get_xlabel().startswith("grid size G") for ax in fig.axes)


def test_grid_sweep_memory_and_budget_skips(tmp_path, monkeypatch):
    """A case whose estimated memory does not fit what is available is skipped ('memory: ...') before it is
    built; past --time-budget the later shapes are skipped ('time budget: ...'); the run still writes its files."""
    import kanfast.cli_checks as cc

    monkeypatch.setitem(bench.SWEEPS["grid"], "grid_size", [3, 5])
    est = {(lb, G): bench._case_bytes(lb, (16, 4, 3, G, 3), 4, 64) for lb in ("kanfast-torch", "floor", "materialized")
           for G in (3, 5)}
    kan, floor, mat = est["kanfast-torch", 3], est["floor", 3], est["materialized", 3]
    fits = est["kanfast-torch", 5][0] + max(est["kanfast-torch", 5][1], est["floor", 5][1])  # kanfast + floor at G=5
    assert kan[0] + mat[0] + max(kan[1], floor[1], mat[1]) > fits * 1.01  # the baseline at G=3 does not fit
    monkeypatch.setattr(cc, "available_memory", lambda: int(fits / bench.MEMORY_FRACTION * 1.01))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)  # (the estimate above, whatever this machine has)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--sweep", "grid", "--layers", "16x4x3", "--peers", "none", "--no-compile",
                              "--repeats", "1", "--warmup", "0", "--time-budget", "1e-9", "--no-memory",
                              "--no-first-call", "--no-progress", "--quiet", "--device", "cpu",
                              "--out", str(tmp_path / "m.json")])
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    rows = data["results"]
    first = {r["impl"]: r for r in rows if r["G"] == 3}
    assert first["kanfast-torch"]["status"] == "ok" and data["floors"][0]["status"] == "ok"
    assert first["materialized"]["status"] == "skipped" and first["materialized"]["note"].startswith("memory:")
    later = {r["impl"]: r for r in rows if r["G"] == 5}
    assert all(r["status"] == "skipped" for r in later.values())
    assert later["kanfast-torch"]["note"].startswith("time budget:") and later["mlp"]["note"].startswith("time budget:")
    assert data["floors"][1]["status"] == "skipped" and data["floors"][1]["note"].startswith("time budget:")
    assert data["floors"][1]["fwd_bwd_ms"] is None and later["kanfast-torch"].get("fwd_bwd_vs_floor") is None


def test_small_sweep_structure_ratios_and_figure(tmp_path, monkeypatch):
    """``--small`` on two tiny models: the compiled baseline's row, kanfast's path, ratios to the MLP and to the
    fastest non-kanfast KAN computed from the recorded times; the figure re-drawn from the JSON."""
    _compile_is_identity(monkeypatch)
    monkeypatch.setattr(bench, "SMALL_MODELS", [("KAN[2,3,1]", [2, 3, 1], 20), ("layer 4->2", [4, 2], 8)])
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--small", "--repeats", "2", "--warmup", "0", "--peers", "none", "--no-progress",
                              "--quiet", "--device", "cpu", "--out", str(tmp_path / "s.json"),
                              "--plot", str(tmp_path / "s.png")])
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["meta"]["compiled_variants"] is True and data["meta"]["case_seconds"] == 1.0
    for model in ("KAN[2,3,1]", "layer 4->2"):
        at = [r for r in data["results"] if r["model"] == model]
        assert [r["impl"] for r in at] == ["kanfast-torch", "kanfast-reference", "materialized",
                                           "materialized+compile", "mlp"]
        assert all(r["status"] == "ok" and r["repeats"] == 2 for r in at)
        assert at[0]["path"] == "sparse"  # tiny calls: the small-call path
        for r in at[:2]:
            _check_ratios(r, at)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = bench.plot_results(tmp_path / "s.json", tmp_path / "again.png")
    assert len(fig.axes) == 2 and all(ax.get_yscale() == "log" for ax in fig.axes)


def test_memory_rule_extrapolates_measured_peaks_and_checks_pykan_before_building():
    """The grid sweep's memory rule: a case's measured peak at an earlier G scales by (G+k+1)/(G0+k+1)
    (never down; the MLP's not at all); pykan's construction (lstsq on in*out (G+1)x(G+k) matrices) is
    part of its estimate and of the --max-elements check made before it is built."""
    assert bench._extrapolate_peak(None, 20, 3) is None
    assert bench._extrapolate_peak((10, 1400.0), 20, 3) == pytest.approx(1400.0 * 24 / 14)
    assert bench._extrapolate_peak((10, 1400.0), 5, 3) == 1400.0  # an earlier, smaller G: kept as measured
    assert bench._extrapolate_peak((10, 1400.0), 500, 3, "mlp") == 1400.0
    shape = (256, 1024, 1024, 50, 3)
    assert bench._pykan_init_elements(shape) == 1024 * 1024 * 51 * 53
    assert bench._case_bytes("pykan", shape, 4)[1] >= 2 * 4 * 1024 * 1024 * 51 * 53
    assert bench._pykan_too_big((4096, 64, 64, 50, 3), 2e8) is None
    assert "(batch, in, out)" in bench._pykan_too_big((4096, 256, 256, 3, 3), 2e8)
    assert "construction" in bench._pykan_too_big((16, 1024, 1024, 50, 3), 2e8)
    assert "least-squares" in bench._pykan_too_big((4096, 64, 64, 200, 3), 2e8)  # 3.4e10 multiply-adds


def test_plan_skips_on_the_extrapolated_measured_peak(monkeypatch):
    """A case whose estimate fits but whose peak measured at the previous G, scaled to this G, does not is
    skipped for memory with that reason; without the measurement it is kept; pykan over --max-elements is
    skipped before anything is counted."""
    import kanfast.cli_checks as cc

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--sweep", "grid", "--layers", "16x4x3", "--peers", "pykan", "--no-compile",
                              "--max-elements", "10"])
    bench._apply_sweep_defaults(args)
    shape, labels = (16, 4, 3, 10, 3), ["kanfast-torch", "materialized", "mlp", "pykan"]
    monkeypatch.setattr(cc, "available_memory", lambda: int(8 * 2**20 / bench.MEMORY_FRACTION))  # 8 MiB usable
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    plan = bench._plan_shape(shape, labels, args, {}, None)
    assert "materialized" not in plan.skip and plan.skip["pykan"].startswith("pykan materialises")
    peaks = {("materialized", 16, 4, 3, 3): (5, 6 * 2**20)}  # 6 MiB at G = 5 -> 10.5 MiB at G = 10
    plan = bench._plan_shape(shape, labels, args, {}, None, peaks)
    assert plan.skip["materialized"].startswith("memory:") and "measured at the previous G" in plan.skip["materialized"]
    assert "mlp" not in plan.skip and "kanfast-torch" not in plan.skip


def test_plan_time_budget_counts_the_shapes_earlier_cases_and_compiles(monkeypatch):
    """The time-budget rule sums the predicted seconds of the cases kept before a case on the same shape,
    and counts a compiled case's compile (its warm-up seconds at the previous G)."""
    import time

    import kanfast.cli_checks as cc

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--sweep", "grid", "--layers", "16x4x3", "--peers", "none", "--warmup", "0"])
    bench._apply_sweep_defaults(args)
    args.max_step_s = None
    monkeypatch.setattr(cc, "available_memory", lambda: None)
    shape = (16, 4, 3, 5, 3)
    labels = ["kanfast-torch", "materialized", "materialized+compile", "mlp"]
    history = {(lb, 16, 4, 3, 3): (5, 1.0, 3.0, 30.0) for lb in ["floor", *labels]}  # 4 s per case at this G
    plan = bench._plan_shape(shape, labels, args, history, time.monotonic() + 10.0)
    assert "kanfast-torch" not in plan.skip and "floor" not in plan.skip  # 4 + 4 s
    assert plan.skip["materialized"].startswith("time budget:") and plan.skip["mlp"].startswith("time budget:")
    plan = bench._plan_shape(shape, labels, args, history, time.monotonic() + 20.0)
    assert "materialized" not in plan.skip and "mlp" not in plan.skip  # 16 s in all
    assert plan.skip["materialized+compile"].startswith("time budget:")  # 4 s + its 30 s compile
