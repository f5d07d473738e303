"""`nanoseek train` killed with SIGKILL after a checkpoint and resumed with --resume logs exactly the losses of
an uninterrupted run (fp32)."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from nanoseek.train.metrics import of_type, read_metrics

STDLIB_JSON = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


def args(out, cache):
    return [sys.executable, "-m", "nanoseek", "train", "--preset", "tiny", "--data", STDLIB_JSON, "--vocab-size", "300",
            "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--steps", "60", "--warmup-steps", "5",
            "--save-every", "4", "--eval-every", "10", "--eval-batches", "2", "--dtype", "fp32", "--threads", "1",
            "--no-progress", "--no-report", "--cache-dir", str(cache), "--out", str(out)]


def checkpoint_step(run):
    try:
        return json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


def records(run, kind):
    return [{k: r[k] for k in ("step", "loss", "main_loss", "mtp_loss", "balance_loss", "val_loss", "grad_norm")
             if k in r} for r in of_type(read_metrics(run / "metrics.jsonl"), kind)]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cache = tmp_path / "cache"
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(args(full, cache), check=True, env=env, capture_output=True, timeout=300)

    proc = subprocess.Popen(args(killed, cache), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while checkpoint_step(killed) < 12 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    at = checkpoint_step(killed)
    assert 12 <= at < 60, at
    out = subprocess.run([sys.executable, "-m", "nanoseek", "train", "--resume", str(killed), "--no-report"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed {killed} at step {at}" in out.stderr

    reference = records(full, "train")
    assert [r["step"] for r in reference] == list(range(1, 61))
    assert records(killed, "train") == reference  # every loss, bit for bit
    assert records(killed, "val") == records(full, "val")
    events = [e["event"] for e in of_type(read_metrics(killed / "metrics.jsonl"), "event")]
    assert events == ["start", "resume", "done"]
