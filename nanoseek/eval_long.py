"""Long-context evaluation: validation loss by position, and passkey retrieval by length and depth.

    nanoseek eval-long DIR [--windows N] [--passkey-samples N] [--lengths ...] [--out DIR]

DIR is the output of ``nanoseek extend`` (then every model of the extension is evaluated: (a) the base run
as trained, (b) the base weights with the final stage's YaRN configuration and no training, (c) each stage)
or any training run directory (that model alone). L is the base run's training length: a run's own, or for
a stage of an extension evaluated alone, its extension's (so that the buckets and lengths match).

1. Loss by position. N validation windows of the longest length (16L by default) from the base run's own
   validation split. A causal model's loss at position p depends only on tokens <= p, so one forward per
   window gives the loss at every position: "loss at length l" (the mean over positions < l) and the loss
   of each position bucket [0, L), [L, 2L), [2L, 4L), ... come from the same tokens for every model.
   The forward is a chunked prefill over the latent cache (:func:`prefill_hidden`): per chunk, only that
   chunk's activations and logits (B x chunk x V) exist, whatever the length.
2. Passkey retrieval (Mohtashami & Jaggi 2023; YaRN paper §4): a random 5-digit key hidden at a given depth
   of filler text; the model must complete "The pass key is" with it. Greedy decoding reproduces the key iff,
   teacher-forced, each of the key's tokens is the argmax given the ones before it, so one forward per
   example scores it exactly. Every example is exactly ``length`` tokens (bos and eos included), so that a
   training example fills one training window (see nanoseek.train.extend). Evaluation depths (EVAL_DEPTHS) are
   disjoint from training depths (TRAIN_DEPTHS) and the keys come from a different seed (nanoseek.passkey).

The latent cache that makes long inputs affordable is reported too (:func:`cache_report`): per token, MLA
caches (d_c + d_R) x layers elements against 2 x heads x d_h x layers for a multi-head cache (SPEC §1, §3).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .allocator import keep_freed_memory
from .atomic import atomic_savefig, atomic_write_json
from .config import ModelConfig, read_json_object
from .passkey import EVAL_DEPTHS, EVAL_SEED, PasskeyExample, PasskeyTooShort, passkey_examples


# ---------------------------------------------------------------------------------------------- chunked prefill
def prefill_hidden(model, ids: torch.Tensor, chunk: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Run ``ids`` (B, T) through the main model chunk by chunk over a latent cache of T slots, as
    ``nanoseek.generate`` prefills a prompt; yield (start, stop, final normed hidden state (B, stop-start, d)).

    Memory: the cache, B x T x (d_c + d_R) per layer (SPEC §3), plus one chunk's activations; logits, if the
    caller forms them, exist for one chunk at a time. Equal to a one-shot forward (fp32, tests/test_long_context).
    """
    from .inference.cache import LatentCache
    from .inference.speculative import chunks

    B, T = ids.shape
    cache = LatentCache.for_model(model, B, T)
    for start, stop in chunks(T, chunk):
        pos = torch.arange(start, stop, device=ids.device).expand(B, stop - start)  # (B, stop - start)
        yield start, stop, model.forward_cached(ids[:, start:stop], pos, cache, absorb=False)


@torch.inference_mode()
def position_losses(model, windows: torch.Tensor, chunk: int | None = None, batch_size: int = 4,
                    progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy at each position (T,) over ``windows`` (N, T + 1) (inputs and labels)."""
    device = model.embed_tokens.weight.device
    N, T = windows.shape[0], windows.shape[1] - 1
    total = torch.zeros(T, dtype=torch.float64)
    for i in range(0, N, batch_size):
        batch = windows[i: i + batch_size].to(device)
        for start, stop, hidden in prefill_hidden(model, batch[:, :-1], chunk):
            logits = model.lm_head(hidden).float()  # (B, C, V), C = stop - start: one chunk's logits at a time
            # (B*C, V) logits, (B*C,) labels -> ce (B, C)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, start + 1: stop + 1].flatten(),
                                                   reduction="none").view(len(batch), -1)
            total[start:stop] += ce.sum(0).double().cpu()
        if progress:
            progress(len(batch))
    return total / N


@torch.inference_mode()
def passkey_correct(model, examples: list[PasskeyExample], bos_id: int, chunk: int | None = None,
                    batch_size: int = 8, progress: Callable[[int], None] | None = None) -> list[bool]:
    """Whether greedy decoding after the question reproduces each example's key (teacher-forced argmax).
    Examples are batched by length."""
    device = model.embed_tokens.weight.device
    out: dict[int, bool] = {}
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_length.setdefault(len(e.ids), []).append(i)
    for n_ids, indices in by_length.items():
        n = n_ids + 1  # bos + ids: the key's tokens are the last answer_len inputs
        for b0 in range(0, len(indices), batch_size):
            group = [examples[i] for i in indices[b0: b0 + batch_size]]
            ids = torch.tensor([[bos_id] + e.ids for e in group], device=device)
            tail = max(e.answer_len for e in group) + 1
            hidden = torch.cat([h[:, max(0, n - tail - start):] for start, stop, h in prefill_hidden(model, ids, chunk)
                                if stop > n - tail], dim=1)  # (B, tail, d): the last `tail` positions
            pred = model.lm_head(hidden).argmax(-1)  # position j predicts token j + 1
            for row, (i, e) in enumerate(zip(indices[b0: b0 + batch_size], group)):
                a = e.answer_len
                out[i] = pred[row, tail - 1 - a: tail - 1].tolist() == e.ids[-a:]  # the last a inputs
            if progress:
                progress(len(group))
    return [out[i] for i in range(len(examples))]


# ---------------------------------------------------------------------------------------------- cache size
def cache_report(config: ModelConfig, length: int, dtype_bytes: int = 2) -> dict[str, Any]:
    """Bytes of one sequence's KV cache at ``length`` tokens: MLA's latent (what nanoseek caches) against an
    MHA cache of the same heads and transformers' per-head K and V (SPEC §1)."""
    from .model import kv_cache_elements_per_token

    per_token = kv_cache_elements_per_token(config)
    latent = per_token["kv_cache_elements_per_token"]
    mha = per_token["mha_cache_elements_per_token"]
    full = per_token["transformers_cache_elements_per_token"]
    return {"length": length, "dtype_bytes": dtype_bytes, "latent_elements_per_token": latent,
            "mha_elements_per_token": mha, "transformers_elements_per_token": full,
            "latent_bytes": latent * length * dtype_bytes, "mha_bytes": mha * length * dtype_bytes,
            "transformers_bytes": full * length * dtype_bytes, "mha_over_latent": mha / latent}


def format_cache_report(name: str, r: dict[str, Any]) -> str:
    gib = 2 ** 30
    return (f"{name}: KV cache of one {r['length']:,}-token sequence ({8 * r['dtype_bytes']}-bit): MLA latent "
            f"{r['latent_elements_per_token']:,} elements/token = {r['latent_bytes'] / gib:.2f} GiB; "
            f"an MHA cache of the same heads {r['mha_elements_per_token']:,} elements/token = "
            f"{r['mha_bytes'] / gib:.1f} GiB ({r['mha_over_latent']:.1f}x); transformers' per-head K and V "
            f"{r['transformers_bytes'] / gib:.1f} GiB")


# ---------------------------------------------------------------------------------------------- models to evaluate
@dataclass
class Subject:
    """A model to evaluate: its label, where its weights come from, and (for (b)) the config to load them into."""

    label: str
    weights: Path
    config_from: Path | None = None  # load `weights` into this checkpoint's ModelConfig (base + YaRN, untrained)
    trained_length: int | None = None

    def load(self, device: torch.device):
        from .hf import load_pretrained

        if self.config_from is None:
            return load_pretrained(self.weights, dtype=torch.float32, device=device).eval()
        from .model import DeepSeekV3
        from .train.build import initialize_from

        with torch.device(device):
            model = DeepSeekV3(ModelConfig.from_hf(self.config_from))
        initialize_from(model, self.weights)
        return model.eval()


def subjects_of(directory: Path) -> tuple[list[Subject], Path, int]:
    """(models, base run directory, base length L) for an extension directory or a single run."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such extension or run directory")
    plan_file = directory / "extend.json"
    if plan_file.is_file():
        plan = read_json_object(plan_file)
        try:
            base, L, factor = Path(plan["base"]), int(plan["base_length"]), float(plan["rope"]["rope_factor"])
            stages = [(str(st["dir"]), int(st["seq_len"])) for st in plan["stages"]]
            final = directory / stages[-1][0]
        except (KeyError, TypeError, ValueError, IndexError) as e:  # edited or damaged by hand
            raise ValueError(f"{plan_file} is not a `nanoseek extend` plan ({type(e).__name__}: {e})") from None
        if not base.is_dir():
            raise FileNotFoundError(f"{directory}: the extension's base run {base} does not exist (moved or deleted)")
        out = [Subject(f"(a) base, trained at {L}", base, trained_length=L),
               Subject(f"(b) base + YaRN s={factor:g}, no training", base, config_from=final, trained_length=L)]
        for i, (name, length) in enumerate(stages, start=1):
            step, steps = _progress(directory / name)
            if step is None:  # before any model is evaluated: (b) takes the final stage's config
                raise ValueError(f"{directory}: the extension is unfinished ({name} has no checkpoint): run the "
                                 "same `nanoseek extend` command again to finish it")
            out.append(Subject(f"(c{i}) stage {i}, trained at {length}"
                               + (f" (unfinished: step {step} of {steps})" if step < steps else ""),
                               directory / name, trained_length=length))
        return out, base, L
    from .train.config import TrainConfig

    cfg_file = directory / "train_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{directory} is neither a `nanoseek extend` output (extend.json) nor a training run "
                                "(train_config.json)")
    cfg = TrainConfig.load(cfg_file)
    L = _extension_base_length(directory) or cfg.seq_len  # a stage alone: its extension's L, as evaluated together
    name = directory.resolve().name  # "." -> the run's own name
    return [Subject(f"{name}, trained at {cfg.seq_len}", directory, trained_length=cfg.seq_len)], directory, L


def _progress(run_dir: Path) -> tuple[int | None, int]:
    """(step of the current checkpoint, steps) of the training run in ``run_dir``; step None without one."""
    from .train import checkpoint as ckpt_io

    try:
        progress = ckpt_io.run_progress(run_dir)
    except (OSError, ValueError, KeyError):  # a damaged checkpoint
        progress = None
    return progress if progress is not None else (None, 0)


def _extension_base_length(run_dir: Path) -> int | None:
    """The base length L of the `nanoseek extend` output that ``run_dir`` is a stage of, or None."""
    run_dir = run_dir.resolve()  # OUT/final -> OUT/stage-k
    plan_file = run_dir.parent / "extend.json"
    if not plan_file.is_file():
        return None
    plan = read_json_object(plan_file)
    stages = plan.get("stages") if isinstance(plan.get("stages"), list) else []
    if any(isinstance(st, dict) and st.get("dir") == run_dir.name for st in stages) and "base_length" in plan:
        return int(plan["base_length"])
    return None


def validation_windows(run_dir: Path, length: int, n: int, log: Callable[[str], None]) -> tuple[torch.Tensor, Any]:
    """n windows of length + 1 tokens spread evenly over the run's validation split, and the prepared data."""
    import numpy as np

    from .train.config import TrainConfig
    from .train.data import PackedSequences, prepare_data

    cfg = TrainConfig.load(run_dir / "train_config.json")
    data = prepare_data(cfg, tokenizer_path=run_dir / "tokenizer.json", log=log)
    seqs = PackedSequences(data.val.tokens(), length)
    if len(seqs) == 0:
        raise ValueError(f"{run_dir}: the validation split holds {data.val.n_tokens:,} tokens, fewer than one window "
                         f"of {length} + 1: lower --lengths")
    idx = np.unique(np.linspace(0, len(seqs) - 1, min(n, len(seqs))).round().astype(np.int64))
    return seqs.batch(idx), data


# ---------------------------------------------------------------------------------------------- the evaluation
def evaluation_passkeys(tokenizer, lengths: list[int], depths: list[float], n: int, given: bool,
                        log: Callable[[str], None]) -> tuple[list[int], list[PasskeyExample]]:
    """(lengths, n examples per length and depth). A length too short for a passkey example is an error naming
    --passkey-lengths when ``given``; of the default lengths, it is left out with a note."""
    if not n:
        return lengths, []
    try:
        examples = passkey_examples(tokenizer, lengths, depths, n, EVAL_SEED, skip_short=not given)
    except PasskeyTooShort as e:
        raise ValueError(f"--passkey-lengths: {e}") from None
    skipped = [length for length in lengths if not any(e.length == length for e in examples)]
    if skipped:
        log(f"note: passkey lengths {', '.join(map(str, skipped))} skipped: too short for a passkey example with "
            "this tokenizer (--passkey-lengths sets the lengths)")
    return [length for length in lengths if length not in skipped], examples


def bucket_edges(base_length: int, max_length: int) -> list[int]:
    """0, L, 2L, 4L, ... up to max_length: the position buckets."""
    edges, e = [0], base_length
    while e < max_length:
        edges.append(e)
        e *= 2
    return edges + [max_length]


def evaluate(directory: str | Path, *, lengths: list[int] | None = None, passkey_lengths: list[int] | None = None,
             depths: list[float] | None = None, windows: int = 16, passkey_samples: int = 10, chunk: int | None = None,
             batch_size: int = 4, device: str = "cpu", progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate every model of ``directory`` (see the module docstring); return the results as a dict."""
    from .train.tokenizer_train import load_tokenizer

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    subjects, base, L = subjects_of(Path(directory))
    lengths = sorted(lengths or [L * k for k in (1, 2, 4, 8, 16)])
    given_passkey_lengths = bool(passkey_lengths)
    passkey_lengths = sorted(passkey_lengths or [L * k for k in (1, 2, 3, 4, 6, 8, 12, 16)])
    depths = list(EVAL_DEPTHS if depths is None else depths)
    if any(n <= 0 for n in lengths + passkey_lengths):
        raise ValueError("lengths must be positive")
    T = max(lengths)
    dev = torch.device(device)
    keep_freed_memory(dev)
    val, data = validation_windows(base, T, windows, log)
    tokenizer = load_tokenizer(base / "tokenizer.json")
    passkey_lengths, examples = evaluation_passkeys(tokenizer, passkey_lengths, depths, passkey_samples,
                                                    given_passkey_lengths, log)
    edges = bucket_edges(L, T)
    log(f"eval-long: {len(subjects)} model(s); loss on {len(val)} validation windows of {T} tokens; passkey: "
        f"{len(examples)} examples ({len(passkey_lengths)} lengths x {len(depths)} depths x {passkey_samples})")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(subjects) * (len(val) + len(examples)), unit="seq", desc="eval-long", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
    results: dict[str, Any] = {"directory": str(directory), "base": str(base), "base_length": L, "lengths": lengths,
                               "passkey_lengths": passkey_lengths, "depths": depths, "windows": len(val),
                               "window_tokens": T, "passkey_samples": passkey_samples, "bucket_edges": edges,
                               "models": []}
    try:
        for s in subjects:
            model = s.load(dev)
            longest = max([T] + [e.length for e in examples])  # loss windows and passkey examples
            if longest > model.config.max_position_embeddings:
                log(f"note: {s.label}: evaluating past its max_position_embeddings "
                    f"({model.config.max_position_embeddings}) up to {longest} tokens")
            if bar is not None:
                bar.set_postfix_str(s.label[:40])
            curve = position_losses(model, val, chunk, batch_size, progress=bar.update if bar else None)
            correct = passkey_correct(model, examples, data.bos_id, chunk, batch_size=2 * batch_size,
                                      progress=bar.update if bar else None)
            acc: dict[str, dict[str, float]] = {}
            for length in passkey_lengths:
                acc[str(length)] = {}
                for depth in depths:
                    hits = [c for c, e in zip(correct, examples) if e.length == length and e.depth == depth]
                    acc[str(length)][f"{depth:g}"] = sum(hits) / len(hits) if hits else float("nan")
            mc = model.config
            results["models"].append({
                "label": s.label, "weights": str(s.weights), "trained_length": s.trained_length,
                "rope": {"rope_scaling_type": mc.rope_scaling_type, "rope_factor": mc.rope_factor,
                         "original_max_position_embeddings": mc.original_max_position_embeddings,
                         "softmax_scale": mc.softmax_scale},
                "loss_by_position": [round(float(v), 5) for v in curve],
                "loss_at_length": {str(n): float(curve[:n].mean()) for n in lengths},
                "loss_by_bucket": {f"{a}-{b}": float(curve[a:b].mean()) for a, b in zip(edges, edges[1:])},
                "passkey": acc,
                "passkey_overall": sum(correct) / len(correct) if correct else None,
                "cache": cache_report(mc, mc.max_position_embeddings, 4),
            })
            del model
    finally:
        if bar is not None:
            bar.close()
    results["cache_deepseek_v3_128k"] = cache_report(ModelConfig.preset("deepseek-v3"), 128 * 1024, 2)
    return results


# ---------------------------------------------------------------------------------------------- output
def markdown_tables(results: dict[str, Any]) -> str:
    """Loss at each length, loss per position bucket, and passkey accuracy per length (mean over depths)."""
    lines = []
    lengths = results["lengths"]
    lines.append("Validation loss (nats/token, mean over positions < length):\n")
    lines.append("| model | " + " | ".join(str(n) for n in lengths) + " |")
    lines.append("|---|" + "---|" * len(lengths))
    for m in results["models"]:
        lines.append(f"| {m['label']} | " + " | ".join(f"{m['loss_at_length'][str(n)]:.3f}" for n in lengths) + " |")
    edges = results["bucket_edges"]
    names = [f"{a}-{b}" for a, b in zip(edges, edges[1:])]
    lines.append("\nValidation loss by position bucket (positions [a, b) of the same windows):\n")
    lines.append("| model | " + " | ".join(f"[{a}, {b})" for a, b in zip(edges, edges[1:])) + " |")
    lines.append("|---|" + "---|" * len(names))
    for m in results["models"]:
        lines.append(f"| {m['label']} | " + " | ".join(f"{m['loss_by_bucket'][k]:.3f}" for k in names) + " |")
    if results["passkey_samples"] and results["passkey_lengths"]:
        pl = results["passkey_lengths"]
        depths = ", ".join(f"{d:g}" for d in results["depths"])
        lines.append(f"\nPasskey accuracy by length (mean over depths {depths}; {results['passkey_samples']} "
                     "examples per length and depth):\n")
        lines.append("| model | " + " | ".join(str(n) for n in pl) + " | all |")
        lines.append("|---|" + "---|" * (len(pl) + 1))
        for m in results["models"]:
            per = [sum(m["passkey"][str(n)].values()) / len(m["passkey"][str(n)]) for n in pl]
            lines.append(f"| {m['label']} | " + " | ".join(f"{v:.2f}" for v in per)
                         + f" | {m['passkey_overall']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """loss_by_position.png and (with passkey results) passkey.png under out_dir."""
    from .train.report import _plt

    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    L, T = results["base_length"], results["window_tokens"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    # per position, averaged over bins of 16 positions, then 4 per doubling, so the log-x curve is readable
    first = min(16, T)
    bins = sorted({0, T} | {round(first * 2 ** (k / 4)) for k in range(4 * int(math.log2(max(T // first, 1))) + 1)})
    lo = hi = None
    for m in results["models"]:
        curve = m["loss_by_position"]
        xs, ys = [], []
        for a, b in zip(bins, bins[1:]):
            seg = curve[a:b]
            if seg:
                xs.append(math.sqrt(max(a, 1) * b))
                ys.append(sum(seg) / len(seg))
        ax.plot(xs, ys, label=m["label"], lw=1.4, marker=".", ms=3)
        lo, hi = min(ys + ([lo] if lo is not None else [])), max(ys + ([hi] if hi is not None else []))
        ls = results["lengths"]
        ax2.plot(ls, [m["loss_at_length"][str(n)] for n in ls], marker="o", label=m["label"])
    for k, x in enumerate(results["bucket_edges"][1:-1]):
        ax.axvline(x, color="gray", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window (log scale; dotted: L, 2L, 4L, ...)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Loss by position, {results['windows']} windows of {T} tokens (L = {L}); "
                 "bins: 16 positions, then 4 per doubling", fontsize=9)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(results["lengths"], [str(n) for n in results["lengths"]])
    ax2.set_xlabel("evaluation length")
    ax2.set_ylabel("mean loss over the first `length` positions")
    ax2.set_title("Loss at each length")
    ax.set_ylim(lo - 0.1, hi + 0.1)
    ax2.legend(fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "loss_by_position.png"
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    paths.append(path)
    if results["passkey_samples"] and results["passkey_lengths"]:
        models = results["models"]
        pl, depths = results["passkey_lengths"], results["depths"]
        fig, axes = plt.subplots(1, len(models), figsize=(4.0 * len(models) + 1, 3.8), squeeze=False)
        for ax, m in zip(axes[0], models):
            grid = [[m["passkey"][str(n)][f"{d:g}"] for n in pl] for d in depths]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            for i in range(len(depths)):
                for j in range(len(pl)):
                    ax.text(j, i, f"{100 * grid[i][j]:.0f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(pl)), [str(n) for n in pl], rotation=60, fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_xlabel("length (tokens)", fontsize=8)
            ax.set_title(m["label"], fontsize=8)
            if m["trained_length"]:  # lengths past the model's training length lie right of the line
                past = [j for j, n in enumerate(pl) if n > m["trained_length"]]
                if past:
                    ax.axvline(past[0] - 0.5, color="black", lw=1.2)
        axes[0][0].set_ylabel("needle depth", fontsize=8)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy (cells: %)")
        fig.suptitle(f"Passkey retrieval ({results['passkey_samples']} examples per cell; held-out depths; "
                     "black line: training length)", fontsize=9)
        path = out_dir / "passkey.png"
        atomic_savefig(fig, path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    else:  # no passkey results: an earlier evaluation's heatmap would pass for this one's
        (out_dir / "passkey.png").unlink(missing_ok=True)
    return paths


# ---------------------------------------------------------------------------------------------- command line
def _int_list(text: str, flag: str) -> list[int]:
    """The comma-separated positive integers of ``text``; a ValueError naming ``flag`` otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-long", help="long-context evaluation: loss by position, passkey retrieval, latent-cache size",
        description="Evaluate a `nanoseek extend` output (base, base + YaRN untrained, each stage) or a run: "
                    "validation loss by position up to the longest length, passkey accuracy by length and depth "
                    "(heatmap), and the latent cache's size.")
    p.add_argument("directory", metavar="DIR", help="a `nanoseek extend` output directory or a training run")
    p.add_argument("--lengths", help="loss lengths, comma-separated (default L,2L,4L,8L,16L; L: the base length)")
    p.add_argument("--passkey-lengths", help="passkey lengths (default L,2L,3L,4L,6L,8L,12L,16L, less those too short "
                                             "for a passkey example)")
    p.add_argument("--depths", help="passkey depths in [0, 1], comma-separated (default 0,0.2,...,1)")
    p.add_argument("--windows", type=int, default=16, help="validation windows of the longest length (default 16)")
    p.add_argument("--passkey-samples", type=int, default=10,
                   help="examples per length and depth, 0: none (default 10)")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk in tokens (default: generate's, 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--out", help="output directory (default DIR/eval-long)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval_long)


def cmd_eval_long(args) -> int:
    depths = None
    if args.depths:
        try:
            depths = [float(v) for v in args.depths.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--depths: expected comma-separated numbers, got {args.depths!r}") from None
        if not depths or not all(0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"--depths must lie in [0, 1], got {args.depths!r}")
    lengths = _int_list(args.lengths, "--lengths") if args.lengths else None
    passkey_lengths = _int_list(args.passkey_lengths, "--passkey-lengths") if args.passkey_lengths else None
    for name in ("windows", "batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.passkey_samples < 0:
        raise ValueError(f"--passkey-samples must be >= 0, got {args.passkey_samples}")
    if args.chunk is not None and args.chunk <= 0:
        raise ValueError(f"--chunk must be positive, got {args.chunk}")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .devices import pick_device

    device = str(pick_device(args.device))  # a one-line error for a device that does not exist here
    out = Path(args.out or Path(args.directory) / "eval-long")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    results = evaluate(args.directory, lengths=lengths, passkey_lengths=passkey_lengths, depths=depths,
                       windows=args.windows, passkey_samples=args.passkey_samples, chunk=args.chunk,
                       batch_size=args.batch_size, device=device, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results, indent=1)
    paths = plot(results, out)
    print(markdown_tables(results))
    print(format_cache_report("deepseek-v3", results["cache_deepseek_v3_128k"]))
    print(f"\nwritten: {out / 'results.json'}, " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
