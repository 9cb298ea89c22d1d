"""The `bilevel ot-metric` command on a small user file (problems/ot_cli.py)."""
import json

import numpy as np
import pytest
import torch

from problems import registry
from problems.cli import main
from problems.ot_data import make_dataset


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("BILEVEL_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("BILEVEL_QUIET", "1")
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cli_json_on_user_file(tmp_path, capsys):
    path = tmp_path / "mine.npy"
    np.save(path, make_dataset("x_paths", 0, n_samples=20)[0, :4].numpy())
    main(["ot-metric", "--dataset", str(path), "--method", "scarvelis", "--quick", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["dataset"] == "mine" and out["method"] == "scarvelis" and out["alignment"] is None
    assert out["seconds"] > 0
    assert list((tmp_path / "results").glob("ot-metric-*/result.json"))


def test_cli_errors(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 10, 2)))
    with pytest.raises(ValueError, match="at least 2 time points"):
        main(["ot-metric", "--dataset", str(bad), "--method", "scarvelis", "--quick"])
    with pytest.raises(SystemExit, match="holdout"):
        main(["ot-metric", "--dataset", "circle", "--method", "scarvelis", "--holdout", "3", "--quick"])
    assert "ot-metric" in registry.EXPERIMENTS


def test_dataset_settings_override_only_their_dataset():
    from problems.ot_cli import SETTINGS, setting
    full = SETTINGS["lagrangian"]["full"]
    assert setting("lagrangian", "mass_splitting")["batch"] == 64 != full["batch"]
    assert setting("lagrangian", "x_paths") == full == setting("lagrangian", "my_cells")
    assert setting("lagrangian", "mass_splitting", quick=True) == SETTINGS["lagrangian"]["quick"]
    assert setting("scarvelis", "mass_splitting") == SETTINGS["scarvelis"]["full"]
