"""Exact resume after SIGKILL (slow): the harness in benchmarks/kill_resume.py with a few kills."""

import importlib.util
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_resume.py"


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    spec = importlib.util.spec_from_file_location("kill_resume", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "kill_resume.json"
    assert module.main(["--kills", "4", "--epochs", "5", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["kills"] == 4 and result["weights_identical"] and result["metrics_identical"]
    assert "checkpoint-write" in result["phases"]
