"""Smoke test of experiments/hybrid_ablation.py: layouts, parameter matching, a tiny run, resume, table."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "hybrid_ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("hybrid_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (folder / f"m{i}.py").write_text(body)
    return folder


def test_layouts_and_matched_parameter_counts(ablation):
    expected = {"mla": "MMMMMMMM", "mla-rope": "MMMMMMMM", "1:1": "KMKMKMKM", "3:1": "KKKMKKKM",
                "7:1": "KKKKKKKM", "kda": "KKKKKKKK", "3:1-rope": "KKKMKKKM", "3:1-no-gate": "KKKMKKKM",
                "3:1-no-conv": "KKKMKKKM"}
    assert set(expected) == set(ablation.VARIANTS)
    for model in (ablation.SMOKE_MODEL, ablation.MODEL):
        column = 3 * model["hidden_size"] * model["num_hidden_layers"]
        widths = {}
        for variant, want in expected.items():
            config, params, target = ablation.matched_config(model, variant)
            assert ablation.layout(config) == want, variant
            assert config.num_experts == 0 and config.vocab_size == 259
            assert abs(params - target) <= column // 2 + 1, (variant, params, target)
            widths[variant] = config.intermediate_size
        # The ablated parts are really gone, so their parameters went to the MLPs.
        assert widths["3:1-no-gate"] > widths["3:1"] and widths["3:1-no-conv"] > widths["3:1"]
        assert widths["3:1-rope"] == widths["3:1"]
    config, _, _ = ablation.matched_config(ablation.SMOKE_MODEL, "3:1-rope")
    assert not config.mla_use_nope


def test_tiny_sweep_resumes_and_tabulates(ablation, corpus_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["--smoke", "--device", "cpu", "--variants", "3:1", "--steps", "2", "--seq-len", "8",
            "--batch-size", "2", "--data", str(corpus_dir), "--out", str(out)]
    assert ablation.main(argv) == 0
    data = json.loads((out / "hybrid_ablation.json").read_text())
    assert (out / "hybrid_ablation.png").stat().st_size > 0
    assert sorted(data["runs"]) == ["3:1"] and not data["failed"]
    run = data["runs"]["3:1"]
    assert run["steps"] == 2 and run["tokens"] == 2 * 2 * 8
    assert math.isfinite(run["val_loss"]) and abs(run["val_ppl"] - math.exp(run["val_loss"])) < 1e-9
    for factor in (1, 2, 4):
        entry = run["extrapolation"][f"{factor}x"]
        assert len(entry["position_loss"]) == 8 * factor and entry["tokens"] > 0
    assert math.isfinite(run["extrapolation"]["4x"]["beyond_loss"])
    # Every window length is scored on the same labels.
    assert len({run["extrapolation"][f]["tokens"] for f in ("1x", "2x", "4x")}) == 1
    windows = run["extrapolation"]["1x"]["window_loss"]
    assert len(windows) == len(run["extrapolation"]["4x"]["window_loss"]) > 1
    assert ablation.paired_difference(run, run) == (0.0, 0.0)

    # A second call finds the run done and trains nothing.
    monkeypatch.setattr(ablation, "run_variant", lambda *a, **k: pytest.fail("a done run was trained again"))
    assert ablation.main(argv) == 0
    assert "| 3:1 | KKKMKKKM |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):
        ablation.main([*argv, "--seed", "1"])
    assert ablation.main(["--table", "--out", str(out)]) == 0
    assert "| mla | — | — | not run |" in capsys.readouterr().out

    # Seeds of one sweep: the table of means and spreads across them.
    for seed, shift in ((0, 0.0), (1, 0.5)):
        copy = json.loads(json.dumps(data))
        copy["settings"]["seed"] = seed
        copy["runs"]["3:1"]["val_loss"] += shift
        (out / f"hybrid_ablation_s{seed}.json").write_text(json.dumps(copy))
    assert ablation.main(["--table", "--tag", "s0,s1", "--out", str(out)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3:1 |"))
    assert f"{run['val_loss'] + 0.25:.4f} ± {0.5 / math.sqrt(2):.4f}" in row and row.endswith("| 0, 1 |")
