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
