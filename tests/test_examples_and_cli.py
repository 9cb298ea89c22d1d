"""The documented example runs and does what it says; the CLI's contract holds."""
import json
import runpy
from pathlib import Path

import pytest

from problems import cli, engine_bench

ROOT = Path(__file__).resolve().parents[1]


def test_custom_problem_example_learns_to_downweight_corrupted_samples():
    ns = runpy.run_path(str(ROOT / "examples" / "custom_problem.py"))
    start, end, weights, grad_ok = ns["main"](steps=60)
    corrupted = ns["corrupted"]
    assert grad_ok
    assert end < 0.2 * start
    assert weights[corrupted].mean() < weights[~corrupted].mean() - 0.2


def test_bench_implicit_json_contract(capsys):
    cli.main(["bench", "implicit", "--K", "20", "--repeats", "1", "--json"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rows = json.loads(last)["rows"]
    assert {r["method"] for r in rows} == {"implicit", "unrolled", "torchopt"}
    for r in rows:
        assert set(r) == {"method", "K", "time_s", "mem_mb", "rel_err"}
        assert r["K"] == 20 and r["time_s"] > 0


def test_bench_rows_converge_to_the_reference():
    row = engine_bench.measure_memory("implicit", 1000)
    assert row["rel_err"] <= 1e-6


def test_results_dirs_never_collide(tmp_path, monkeypatch):
    from problems.report import results_dir
    monkeypatch.setenv("BILEVEL_RESULTS", str(tmp_path))
    dirs = {results_dir("x") for _ in range(5)}
    assert len(dirs) == 5 and all(d.is_dir() for d in dirs)


def test_unknown_experiment_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown experiment"):
        cli.main(["reproduce", "no-such-thing"])


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["lam"].grad is not None and bool(ns["lam"].grad.abs().sum() > 0)


def test_a_failing_experiment_keeps_the_others_results(tmp_path, monkeypatch, capsys):
    from problems import registry

    def ok(quick, outdir):
        return [{"experiment": "ok", "setting": "s", "metric": "m", "ours": 1.0, "published": 2.0}]

    def broken(quick, outdir):
        raise RuntimeError("boom")

    monkeypatch.setattr(registry, "EXPERIMENTS", {"broken": broken, "ok": ok})
    monkeypatch.setenv("BILEVEL_RESULTS", str(tmp_path))
    with pytest.raises(SystemExit, match="experiments failed: broken"):
        cli.main(["reproduce", "--quick", "--json"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert rows[0]["setting"] == "FAILED" and "boom" in rows[0]["metric"]
    assert rows[1]["ours"] == 1.0
    saved = list(tmp_path.glob("reproduce-quick-*/ok/rows.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())[0]["ours"] == 1.0
