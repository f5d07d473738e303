"""The run report: ``report.md`` with PNG plots (matplotlib, Agg) from ``metrics.jsonl``, and a sample.

Plots (``plots/``): loss.png (train and validation loss against the unigram baseline), mtp.png (MTP loss per
depth), expert_load.png (per MoE layer, each expert's share of the routed tokens relative to the mean, over
the steps: a balanced layer is uniformly 1), maxvio.png (MaxVio_batch per layer and MaxVio_global on
validation), throughput.png (tokens/s and learning rate).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..atomic import atomic_savefig, atomic_write_json, atomic_write_text
from .metrics import as_float, of_type, read_metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        if math.isfinite(v):
            acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc if acc is not None else float("nan"))
    return out


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if key in r:
            xs.append(r["step"])
            ys.append(as_float(r[key]))
    return xs, ys


def _layer_names(model: dict, n: int) -> list[str]:
    """Names of the rows of expert_counts: the main model's MoE layers, then the MTP blocks."""
    first = model.get("first_k_dense_replace", 0) or 0
    n_main = max(0, (model.get("num_hidden_layers") or n) - first)
    if not model or n_main > n:
        return [f"MoE layer {i}" for i in range(n)]
    return [f"layer {first + i}" for i in range(n_main)] + [f"MTP {k + 1}" for k in range(n - n_main)]


def make_plots(run_dir: Path, records: list[dict], unigram: float | None,
               model: dict | None = None) -> list[tuple[str, str]]:
    """Write the PNGs; return (title, relative path) of each."""
    plt = _plt()
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    train = [r for r in of_type(records, "train") if not r.get("skipped")]
    val = of_type(records, "val")
    out: list[tuple[str, str]] = []

    def finish(fig, name: str, title: str) -> None:
        fig.tight_layout()
        atomic_savefig(fig, plots / name, dpi=110)
        plt.close(fig)
        out.append((title, f"plots/{name}"))

    # loss
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x, y = _series(train, "main_loss")
    if x:
        ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(x, _ema(y), color="tab:blue", lw=1.8, label="train next-token loss (EMA)")
    xv, yv = _series(val, "val_loss")
    if xv:
        ax.plot(xv, yv, "o-", color="tab:red", lw=1.5, ms=4, label="validation loss")
    if unigram is not None:
        ax.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram model ({unigram:.2f})")
    ax.set_xlabel("step"), ax.set_ylabel("cross-entropy (nats/token)"), ax.set_title("Loss")
    ax.grid(alpha=0.3), ax.legend()
    finish(fig, "loss.png", "Train and validation loss")

    # MTP
    depth = max((len(r.get("mtp_losses") or []) for r in train), default=0)
    if depth:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        x, y = _series(train, "main_loss")
        ax.plot(x, _ema(y), color="tab:blue", lw=1.5, label="main head (EMA)")
        for k in range(depth):
            xs = [r["step"] for r in train if len(r.get("mtp_losses") or []) > k]
            ys = [as_float(r["mtp_losses"][k]) for r in train if len(r.get("mtp_losses") or []) > k]
            ax.plot(xs, _ema(ys), lw=1.5, label=f"MTP depth {k + 1}: predicts t+{k + 2} (EMA)")
            xv = [r["step"] for r in val if len(r.get("val_mtp_losses") or []) > k]
            yv = [as_float(r["val_mtp_losses"][k]) for r in val if len(r.get("val_mtp_losses") or []) > k]
            if xv:
                ax.plot(xv, yv, "s--", ms=4, lw=1, label=f"MTP depth {k + 1}, validation")
        ax.set_xlabel("step"), ax.set_ylabel("cross-entropy (nats/token)"), ax.set_title("Multi-token prediction loss")
        ax.grid(alpha=0.3), ax.legend()
        finish(fig, "mtp.png", "MTP loss")

    # expert load heatmap
    counted = [r for r in train if r.get("expert_counts")]
    if counted:
        import numpy as np

        layers = len(counted[0]["expert_counts"])
        E = len(counted[0]["expert_counts"][0])
        names = _layer_names(model or {}, layers)
        steps = [r["step"] for r in counted]
        n_bins = min(len(counted), 120)
        edges = np.linspace(0, len(counted), n_bins + 1).astype(int)
        fig, axes = plt.subplots(layers, 1, figsize=(9, 1.2 + 1.6 * layers), squeeze=False, sharex=True)
        arr = np.asarray([r["expert_counts"] for r in counted], dtype=np.float64)  # (S, L, E)
        im = None
        for layer in range(layers):
            ax = axes[layer][0]
            cols = []
            for a, b in zip(edges[:-1], edges[1:]):
                c = arr[a:max(b, a + 1), layer].sum(0)
                cols.append(c / max(c.mean(), 1e-9))
            img = np.stack(cols, axis=1)  # (E, bins)
            im = ax.imshow(img, aspect="auto", cmap="RdBu_r", vmin=0.0, vmax=2.0, interpolation="nearest",
                           extent=(steps[0], max(steps[-1], steps[0] + 1), E - 0.5, -0.5))  # one step: 1 wide
            ax.set_ylabel(f"{names[layer]}\nexpert", fontsize=8)
        axes[-1][0].set_xlabel("step")
        fig.suptitle("Expert load: tokens routed to each expert / mean (1 = balanced)")
        fig.colorbar(im, ax=[a[0] for a in axes], shrink=0.8, label="load / mean")
        atomic_savefig(fig, plots / "expert_load.png", dpi=110)
        plt.close(fig)
        out.append(("Expert load per MoE layer", "plots/expert_load.png"))

    # MaxVio
    mv = [r for r in train if r.get("maxvio_batch")]
    if mv:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        layers = len(mv[0]["maxvio_batch"])
        names = _layer_names(model or {}, layers)
        xs = [r["step"] for r in mv]
        for layer in range(layers):
            ax.plot(xs, _ema([as_float(r["maxvio_batch"][layer]) for r in mv]), lw=1, alpha=0.8,
                    label=f"{names[layer]}: MaxVio_batch (EMA)")
        ax.plot(xs, _ema([as_float(r["maxvio_batch_mean"]) for r in mv]), color="black", lw=2, label="mean over layers")
        xv = [r["step"] for r in val if "maxvio_global_mean" in r]
        if xv:
            ax.plot(xv, [as_float(r["maxvio_global_mean"]) for r in val if "maxvio_global_mean" in r], "o--",
                    color="tab:red", label="MaxVio_global (validation)")
        ax.set_xlabel("step"), ax.set_ylabel("(max load - mean) / mean"), ax.set_title("Load imbalance (MaxVio)")
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
        finish(fig, "maxvio.png", "MaxVio per MoE layer")

    # throughput
    if train:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        x, y = _series(train, "tokens_per_s")
        ax.plot(x, y, color="tab:green", alpha=0.3, lw=0.8)
        ax.plot(x, _ema(y), color="tab:green", lw=1.8, label="tokens/s (EMA)")
        ax.set_xlabel("step"), ax.set_ylabel("tokens/s")
        ax2 = ax.twinx()
        x, y = _series(train, "lr")
        ax2.plot(x, y, color="tab:purple", lw=1, ls=":", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax.set_title("Throughput and learning rate")
        ax.grid(alpha=0.3)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="lower right")
        finish(fig, "throughput.png", "Throughput")
    return out


def _fmt(v: Any, spec: str = ".4f") -> str:
    v = as_float(v)
    return format(v, spec) if math.isfinite(v) else "n/a"


def summarize(records: list[dict], data: dict, cfg: dict) -> dict[str, Any]:
    train = [r for r in of_type(records, "train") if not r.get("skipped")]
    val = of_type(records, "val")
    tail = train[-20:]
    s: dict[str, Any] = {
        "steps": train[-1]["step"] if train else 0,
        "planned_steps": cfg.get("steps"),
        "tokens": train[-1]["tokens"] if train else 0,
        "elapsed_s": train[-1]["elapsed"] if train else 0.0,
        "skipped_steps": len([r for r in of_type(records, "train") if r.get("skipped")]),
        "train_loss": statistics.fmean(as_float(r["main_loss"]) for r in tail) if tail else None,
        "tokens_per_s": statistics.median(as_float(r["tokens_per_s"]) for r in train[1:]) if len(train) > 1 else None,
        "unigram_val_loss": data.get("unigram_val_loss"),
    }
    if val:
        last = val[-1]
        s.update(val_loss=last["val_loss"], val_ppl=last["val_ppl"], val_step=last["step"],
                 val_mtp_losses=last.get("val_mtp_losses"), maxvio_global=last.get("maxvio_global"),
                 maxvio_global_mean=last.get("maxvio_global_mean"),
                 best_val_loss=min(as_float(r["val_loss"]) for r in val))
    if tail and tail[-1].get("mtp_losses"):
        s["train_mtp_losses"] = [statistics.fmean(as_float(r["mtp_losses"][k]) for r in tail)
                                 for k in range(len(tail[-1]["mtp_losses"]))]
    mv = [r for r in tail if "maxvio_batch_mean" in r]
    if mv:
        s["maxvio_batch_mean"] = statistics.fmean(as_float(r["maxvio_batch_mean"]) for r in mv)
    stops = [r for r in of_type(records, "event") if r.get("event") in ("time_budget", "stopped", "done")]
    s["stopped_by"] = stops[-1]["event"] if stops else "interrupted"
    return s


def write_report(run_dir: str | Path, sample: bool = True, prompt: str | None = None, max_new_tokens: int | None = None,
                 log=print) -> Path:
    """Write ``run_dir/report.md`` (and plots, and ``sample.json`` when sampling); return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir} has no metrics.jsonl records: not a training run (or it has not logged yet)")
    if not (run_dir / "train_config.json").is_file():
        raise ValueError(f"{run_dir} has no train_config.json: not a nanoseek training run")
    data = _read_json(run_dir / "data.json")
    cfg = _read_json(run_dir / "train_config.json")
    start = next((r for r in of_type(records, "event") if r.get("event") == "start"), {})
    try:
        s = summarize(records, data, cfg)
    except (KeyError, TypeError, IndexError) as e:  # a hand-edited or foreign metrics file
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has a record without a field the report reads "
                         f"({type(e).__name__}: {e})") from None
    plots = make_plots(run_dir, records, s.get("unigram_val_loss"), start.get("model"))

    sample_info = None
    if sample:
        sample_info = _sample(run_dir, cfg, prompt, max_new_tokens, log)
        if sample_info:
            atomic_write_json(run_dir / "sample.json", sample_info, ensure_ascii=False)

    model = start.get("model", {})
    saved = _checkpoint_step(run_dir)
    lines = [f"# Training report: `{run_dir}`", ""]
    rows = [
        ("steps", f"{s['steps']:,} of {s['planned_steps']:,} ({s['stopped_by'].replace('_', ' ')})"
         + (f"; {s['skipped_steps']} skipped (NaN/inf)" if s["skipped_steps"] else "")
         + (f"; last checkpoint at step {saved:,} (the weights of the sample; a resume continues from it)"
            if saved is not None and saved < s["steps"] else "")),
        ("tokens", f"{s['tokens']:,} ({cfg.get('batch_size')} x {cfg.get('grad_accum')} x {cfg.get('seq_len')} per step"
                   + (f"; batch-size warmup from {cfg['batch_warmup_start']} sequences over "
                      f"{cfg['batch_warmup_tokens']:,} tokens" if cfg.get("batch_warmup_start") else "") + ")"),
        ("training time", f"{s['elapsed_s'] / 60:.1f} min; median {_fmt(s['tokens_per_s'], ',.0f')} tokens/s"),
        ("model", f"preset `{cfg.get('preset')}`, {start.get('params', 0) / 1e6:.2f} M parameters; "
                  f"{model.get('num_hidden_layers')} layers, d {model.get('hidden_size')}, "
                  f"{model.get('n_routed_experts')} routed experts top-{model.get('num_experts_per_tok')}, "
                  f"MTP depth {model.get('num_nextn_predict_layers')}, vocabulary {model.get('vocab_size')}"),
        ("objectives", f"balance `{cfg.get('balance')}`, "
                       + (f"MTP lambda {cfg.get('mtp_lambda')} then {cfg.get('mtp_lambda_later')}"
                          if model.get("num_nextn_predict_layers") else "no MTP loss (depth 0)")
                       + f", {cfg.get('dtype')}, lr {cfg.get('lr')}"),
        ("data", f"{', '.join(data.get('sources', []))}: {data.get('documents', {}).get('train', '?')} train / "
                 f"{data.get('documents', {}).get('val', '?')} validation documents, "
                 f"{data.get('tokens', {}).get('train', 0):,} / {data.get('tokens', {}).get('val', 0):,} tokens"
                 + (f"; skipped {sum(data['skipped'].values())} files ("
                    + ", ".join(f"{n} {k}" for k, n in data["skipped"].items()) + ")" if data.get("skipped") else "")),
        ("train loss (main head, last 20 steps)", _fmt(s["train_loss"])),
    ]
    if "val_loss" in s:
        rows.append((f"validation loss (step {s['val_step']})", f"{_fmt(s['val_loss'])} (perplexity {_fmt(s['val_ppl'], '.2f')})"))
    if s.get("unigram_val_loss") is not None:
        u = s["unigram_val_loss"]
        gap = u - s["val_loss"] if "val_loss" in s else None
        rows.append(("unigram baseline on validation", f"{u:.4f} (perplexity {math.exp(u):.1f})"
                     + (f"; the model's validation loss is {abs(gap):.2f} nats/token "
                        f"{'below' if gap >= 0 else 'above'} it" if gap is not None else "")))
    if s.get("val_mtp_losses"):
        rows.append(("MTP loss, validation", ", ".join(f"depth {k + 1}: {_fmt(v)}" for k, v in enumerate(s["val_mtp_losses"]))))
    if s.get("maxvio_global_mean") is not None:
        rows.append(("MaxVio_global (validation, mean over MoE layers)", _fmt(s["maxvio_global_mean"], ".3f")
                     + " (per layer: " + ", ".join(_fmt(v, ".3f") for v in s["maxvio_global"]) + ")"))
    if s.get("maxvio_batch_mean") is not None:
        rows.append(("MaxVio_batch (last 20 steps)", _fmt(s["maxvio_batch_mean"], ".3f")))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    for title, rel in plots:
        lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    if sample_info:
        lines += ["## Sample", "",
                  f"{sample_info['method']}, temperature {sample_info['temperature']}, top-k {sample_info['top_k']}, "
                  f"seed {sample_info['seed']}, {sample_info['tokens']} tokens"
                  + (f", MTP draft acceptance {sample_info['acceptance_rate']:.0%}" if sample_info.get("acceptance_rate") is not None else "")
                  + ". The prompt, then the completion:", "",
                  "```python", sample_info["prompt"] + sample_info["completion"], "```", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_json(run_dir / "summary.json", s)
    return path


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's current checkpoint (None without a readable one): behind the last logged step when
    the run was killed or stopped between two saves."""
    from ..hf import CheckpointError
    from .checkpoint import current_checkpoint, read_trainer_state

    try:
        ckpt = current_checkpoint(run_dir)
        return read_trainer_state(ckpt)["step"] if ckpt is not None else None
    except CheckpointError:
        return None


def _sample(run_dir: Path, cfg: dict, prompt: str | None, max_new_tokens: int | None, log) -> dict | None:
    from ..hf import CheckpointError
    from .checkpoint import current_checkpoint, load_model
    from .sample import complete
    from .tokenizer_train import load_tokenizer, special_ids

    try:
        ckpt = current_checkpoint(run_dir)
    except CheckpointError as e:
        log(f"report: no sample ({e})")
        return None
    if ckpt is None:
        log("report: no sample (the run has no checkpoint yet)")
        return None
    import torch

    try:
        model = load_model(ckpt, torch.device("cpu"))
    except CheckpointError as e:  # a damaged checkpoint: the report of the metrics is still written
        log(f"report: no sample ({e})")
        return None
    tok_file = run_dir / "tokenizer.json"
    tok = load_tokenizer(tok_file if tok_file.is_file() else ckpt / "tokenizer.json")
    ids = special_ids(tok, where=tok_file)
    return complete(model, tok, prompt if prompt is not None else cfg.get("sample_prompt", "def "),
                    max_new_tokens if max_new_tokens is not None else cfg.get("sample_tokens", 64),
                    bos_id=ids.bos_id, eos_id=ids.eos_id, seed=cfg.get("seed", 0))
