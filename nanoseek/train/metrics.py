"""metrics.jsonl: one JSON object per line, appended as training goes.

Record types (field ``type``):
  train  step, tokens, loss (the total objective), main_loss, mtp_loss (mean over depths, before lambda),
         mtp_losses [L_1..L_D], balance_loss (before alpha), lr, mtp_lambda, bias_gamma, balance_alpha,
         grad_norm, tokens_per_s, step_time, elapsed (training seconds, across resumes), skipped (NaN/inf),
         expert_counts [[tokens per expert] per MoE layer, MTP blocks last] summed over the step's micro-batches,
         maxvio_batch [per MoE layer], maxvio_batch_mean
  val    step, tokens, val_loss, val_ppl, val_mtp_losses, maxvio_global [per MoE layer], maxvio_global_mean,
         val_tokens
  event  step, event ("start", "resume", "fit_steps", "nonfinite", "time_budget", "stopped", "done"), message;
         fit_steps: steps (the number fitted to the time budget); distributed runs' start and resume: layout
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from ..atomic import atomic_write_text


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(_clean(record), separators=(",", ":"))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (what a killed run logged after its last checkpoint)."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records; a line cut short by a kill (the last one) is ignored."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def of_type(records: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("type") == kind]


def as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
