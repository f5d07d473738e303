"""The experiment scripts run their `nanoseek ...` commands with their own interpreter."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake_run(argv, **kwargs):
        seen.append(list(argv))
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("PATH", "")  # no `nanoseek` command: an interpreter run without activating its venv
    return seen


def test_experiments_run_trains_with_this_interpreter(tmp_path, calls):
    exp = _load("experiments/run.py", "nanoseek_experiments_run")
    (tmp_path / "bias-d1").mkdir()
    _, cmd, _ = exp.train_arm("bias-d1", 2, 1, tmp_path, force=True)
    assert cmd[:2] == ["nanoseek", "train"]  # the recorded command (results.md, the reuse stamp) is unchanged
    assert calls == [[sys.executable, "-m", *cmd]]


def test_long_context_run_uses_this_interpreter(tmp_path, calls):
    exp = _load("experiments/long-context/run.py", "nanoseek_experiments_long_context_run")
    cmd = ["nanoseek", "eval-long", str(tmp_path)]
    exp.run(cmd, tmp_path / "eval.log")
    assert calls == [[sys.executable, "-m", *cmd]]
