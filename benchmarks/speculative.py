"""MTP speculative decoding on a model trained inside the benchmark: acceptance per MTP depth and decode
tokens/s with and without speculation.

A benchmark, not a test.

  * Data: the Python standard library's own ``*.py`` files (``sysconfig.get_paths()['stdlib']``, top level,
    sorted), as raw bytes: a byte-level "tokenizer" with vocabulary 256, nothing to train. Every 20th file is
    held out; prompts and the validation loss come from the held-out files.
  * Model: a small DeepSeek-V3 (MLA, 1 dense + MoE layers with a shared expert, sigmoid noaux_tc routing with
    groups, ``--depth`` MTP modules), trained from scratch for ``--train-steps`` AdamW steps (or until
    ``--train-budget`` seconds) with the V3 objective from ``nanoseek.objectives.training_loss`` (main
    cross-entropy + lambda x mean MTP loss + sequence balance loss) and the auxiliary-loss-free bias update.
  * Decode: ``nanoseek.generate`` on each prompt (batch 1), plain and speculative back to back per prompt, the
    first mode rotating, two passes; greedy and sampled (``--temperature``, seeded). Greedy speculative output
    must equal plain output. With ``--depth 2`` the depth-1 variant (drafting with the first MTP module only)
    is measured too. Default 1 torch thread (see ``--threads``).
    Tokens/s = new tokens after the first / decode time, summed over the prompts (``GenerationStats``).
  * Acceptance per depth k: the share of draft steps whose depth-k draft was accepted (it needs depths < k);
    conditional: accepted at depth k / accepted at depth k - 1.

Results are printed and appended, as a dated section, to benchmarks/results/speculative.md.

Usage (from the repository root, with the venv active)::

    python benchmarks/speculative.py                      # ~4-9 minutes on a 2-core machine
    python benchmarks/speculative.py --train-steps 50 --new-tokens 32 --no-write   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import QuietWaiter, cpu_busy_seconds, loadavg, machine_info  # noqa: E402  (shared helpers)

from nanoseek import DeepSeekV3, ModelConfig, generate  # noqa: E402
from nanoseek.objectives import training_loss, update_balance_bias  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "speculative.md"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--depth", type=int, default=2, help="MTP modules (D)")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--train-budget", type=float, default=480.0, help="stop training after this many seconds")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mtp-lambda", type=float, default=0.3)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=96, help="prompt bytes")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=0.7, help="for the sampled runs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the model is tiny, and on a shared 2-core machine two OpenMP "
                        "threads stall on every small op whenever another process takes a core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-quiet", type=float, default=60.0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data
def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train bytes, held-out bytes, number of files) from the standard library's top-level .py files."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % 20 == 0 else train).append(f.read_bytes())
    to_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return to_tensor(train), to_tensor(held), len(files)


def batch(data: torch.Tensor, B: int, T: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - T - 1, (B,), generator=g)
    return torch.stack([data[s: s + T + 1] for s in starts.tolist()])  # (B, T + 1)


def model_config(args) -> ModelConfig:
    d = args.hidden
    return ModelConfig(
        vocab_size=256, hidden_size=d, num_hidden_layers=args.layers, first_k_dense_replace=1,
        num_attention_heads=4, q_lora_rank=d // 2, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, intermediate_size=3 * d, moe_intermediate_size=96, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, rope_scaling_type=None, rope_factor=1.0,
        original_max_position_embeddings=1024, max_position_embeddings=1024, num_nextn_predict_layers=args.depth,
        initializer_range=0.02, bos_token_id=None, eos_token_id=None)


# ---------------------------------------------------------------------------------------------- training
def train(model: DeepSeekV3, data: torch.Tensor, held: torch.Tensor, args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.train_steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, cosine to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.train_steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    model.train()
    log, start, step = [], time.perf_counter(), 0
    for step in range(args.train_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        window = batch(data, args.batch, args.seq, g)
        out = model.forward_train(window[:, :-1])
        loss = training_loss(out, window[:, 1:], mtp_lambda=args.mtp_lambda)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_balance_bias(model, out.expert_counts, gamma=1e-3)
        elapsed = time.perf_counter() - start
        if step % 50 == 0 or step == args.train_steps - 1:
            mtp = ", ".join(f"{x.item():.3f}" for x in loss.mtp_per_depth)
            print(f"step {step:4d}  loss {loss.main.item():.3f}  mtp [{mtp}]  {elapsed:.0f} s", flush=True)
            log.append((step, loss.main.item(), [x.item() for x in loss.mtp_per_depth]))
        if elapsed > args.train_budget:
            print(f"training budget reached after {step + 1} steps", flush=True)
            break
    model.eval()
    with torch.no_grad():  # held-out loss, fixed windows
        gv = torch.Generator().manual_seed(1234)
        window = batch(held, 16, args.seq, gv)
        val = training_loss(model.forward_train(window[:, :-1]), window[:, 1:])
    return {"steps": step + 1, "seconds": time.perf_counter() - start, "log": log,
            "val_main": val.main.item(), "val_mtp": [x.item() for x in val.mtp_per_depth],
            "tokens": (step + 1) * args.batch * args.seq}


@torch.no_grad()
def teacher_forced_acceptance(model: DeepSeekV3, held: torch.Tensor, args) -> dict:
    """Acceptance the rule would have on held-out code, per depth, given that the earlier depths were accepted.

    Depth k's draft for t_{i+k+1} (MTP logits at position i) is judged against the main model's distribution
    for the same token (main logits at position i + k): greedy accepts iff the argmaxes agree; sampling at the
    temperature accepts with probability sum_x min(p(x), q(x)).
    """
    from nanoseek.inference import logits_to_probs

    window = batch(held, 16, args.seq, torch.Generator().manual_seed(4321))
    out = model.forward_train(window[:, :-1])
    greedy, sampled = [], []
    for k, mtp in enumerate(out.mtp_logits, start=1):
        main = out.logits[:, k:]  # (B, T - k, V): position i + k predicts t_{i+k+1}, as mtp position i does
        greedy.append(float((mtp.argmax(-1) == main.argmax(-1)).float().mean()))
        p, q = logits_to_probs(main, args.temperature), logits_to_probs(mtp, args.temperature)
        sampled.append(float(torch.minimum(p, q).sum(-1).mean()))
    return {"greedy": greedy, "sampled": sampled}


# ---------------------------------------------------------------------------------------------- decoding
def prompts_from(held: torch.Tensor, n: int, length: int, seed: int) -> list[list[int]]:
    """n prompts of ``length`` bytes, each starting at the beginning of a line of held-out code."""
    g = torch.Generator().manual_seed(seed)
    newlines = (held == 10).nonzero().flatten()
    out = []
    while len(out) < n:
        start = int(newlines[torch.randint(0, newlines.numel() - 1, (1,), generator=g)]) + 1
        p = held[start: start + length].tolist()
        if len(p) == length and bytes(p).strip():
            out.append(p)
    return out


def run_once(model: DeepSeekV3, prompt: list[int], args, speculative: bool, depth: int, temperature: float,
             seed: int, quiet) -> dict:
    """generate() one prompt in one mode; drafting uses the first ``depth`` MTP modules."""
    full = model.mtp
    model.mtp = torch.nn.ModuleList(list(full)[:depth])
    try:
        quiet()
        b0, c0, t0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
        r = generate(model, [prompt], args.new_tokens, temperature=temperature, seed=seed, speculative=speculative)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        model.mtp = full
    s = r.stats
    return {"tokens": s.new_tokens - 1, "seconds": s.decode_s, "steps": s.decode_steps, "drafted": s.drafted,
            "accepted": s.accepted, "draft_steps": s.draft_steps, "per_depth": s.accepted_per_depth,
            "output": r.tokens[0],
            "others": max(0.0, cpu_busy_seconds() - b0 - cpu) / (wall * (os.cpu_count() or 1))}


def measure(model, prompts, args, quiet) -> list[dict]:
    """Per prompt, every mode back to back (order rotating), twice; totals per mode."""
    modes = [("plain", False, 0)] + [(f"MTP D={d}", True, d) for d in sorted({1, args.depth})]
    rows = []
    for temperature in (0.0, args.temperature):
        runs = {name: [] for name, _, _ in modes}
        for rep in range(2):
            for i, prompt in enumerate(prompts):
                shift = (rep * len(prompts) + i) % len(modes)
                for name, spec, depth in modes[shift:] + modes[:shift]:
                    runs[name].append(run_once(model, prompt, args, spec, depth, temperature, args.seed + i, quiet))
        base = None
        for name, spec, depth in modes:
            rs = runs[name]
            row = {"mode": name, "temperature": temperature,
                   "tokens_per_s": sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs),
                   "tokens_per_step": sum(r["tokens"] for r in rs) / sum(r["steps"] for r in rs),
                   "outputs": [r["output"] for r in rs[: len(prompts)]], "others": max(r["others"] for r in rs)}
            if spec:
                draft_steps = sum(r["draft_steps"] for r in rs)
                per_depth = [sum(r["per_depth"][k] for r in rs) for k in range(depth)]
                row["acceptance"] = sum(r["accepted"] for r in rs) / sum(r["drafted"] for r in rs)
                row["per_depth"] = [a / draft_steps for a in per_depth]
                row["conditional"] = [per_depth[0] / draft_steps] + [
                    per_depth[k] / per_depth[k - 1] if per_depth[k - 1] else 0.0 for k in range(1, depth)]
            else:
                base = row
            rows.append(row)
        for row in rows[-len(modes):]:
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            if temperature == 0.0:
                row["same_as_plain"] = row["outputs"] == base["outputs"]
            label = f"{row['mode']:>8} T={temperature}: {row['tokens_per_s']:7.1f} tok/s ({row['speedup']:.2f}x)"
            if "per_depth" in row:
                label += f", acceptance per depth {[round(x, 3) for x in row['per_depth']]}"
            print(label, flush=True)
    return rows


def report(args, cfg: ModelConfig, n_files: int, train_bytes: int, trained: dict, tf: dict, prompts, rows: list[dict],
           params: dict, waited: float) -> str:
    info = machine_info(args, torch.device("cpu"))
    lines = [f"## {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} - MTP speculative decoding, D={args.depth}", ""]
    lines.append(f"- Machine: {info['cpu']}, {info['cores']} cores, {info.get('ram_gib', '?')} GiB RAM, torch "
                 f"{info['torch']} ({args.threads} threads), git {info['git']}; load average after the run {loadavg()}")
    lines.append(f"- Data: {n_files} top-level stdlib .py files of Python {sys.version.split()[0]}, bytes as tokens "
                 f"(vocab 256); {train_bytes / 1e6:.1f} MB for training, every 20th file held out")
    lines.append(f"- Model: d={cfg.hidden_size}, {cfg.num_hidden_layers} layers (1 dense), {cfg.num_attention_heads} "
                 f"heads, d_c={cfg.kv_lora_rank}, {cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok} "
                 f"(4 groups, 2 kept) + 1 shared, D={cfg.num_nextn_predict_layers} MTP modules; "
                 f"{params['total_params'] / 1e6:.2f}M main parameters + {params['mtp_params'] / 1e6:.2f}M MTP")
    lines.append(f"- Training: {trained['steps']} AdamW steps x {args.batch} x {args.seq} bytes "
                 f"({trained['tokens'] / 1e6:.2f}M tokens) in {trained['seconds']:.0f} s, lr {args.lr} "
                 f"(warmup, cosine), lambda_MTP {args.mtp_lambda}; held-out loss main {trained['val_main']:.3f} "
                 f"nats/byte, MTP per depth {[round(x, 3) for x in trained['val_mtp']]}")
    lines.append(f"- Decode: {args.prompts} held-out prompts of {args.prompt_len} bytes, batch 1, "
                 f"{args.new_tokens} new tokens each; per prompt all modes back to back (order rotating), two "
                 f"passes; greedy and temperature {args.temperature} (seeded). Waited {waited:.0f} s in total for "
                 f"idle CPUs; max CPU share used by other processes during a run: "
                 f"{max(r['others'] for r in rows):.2f}.")
    lines.append(f"- Teacher-forced acceptance on held-out code (16 x {args.seq} bytes), per depth, given the "
                 f"earlier depths accepted: greedy {[round(x, 3) for x in tf['greedy']]}, temperature "
                 f"{args.temperature} {[round(x, 3) for x in tf['sampled']]}")
    if args.note:
        lines.append(f"- Note: {args.note}")
    lines += ["", "| mode | temperature | decode tok/s | speedup vs plain | tokens / forward step | acceptance "
                  "(all drafts) | accepted per depth (share of steps) | conditional per depth | greedy = plain |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['acceptance']:.3f}" if "acceptance" in r else "-"
        per = ", ".join(f"{x:.3f}" for x in r["per_depth"]) if "per_depth" in r else "-"
        cond = ", ".join(f"{x:.3f}" for x in r["conditional"]) if "conditional" in r else "-"
        same = str(r.get("same_as_plain", "-")) if r["mode"] != "plain" else "-"
        lines.append(f"| {r['mode']} | {r['temperature']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['tokens_per_step']:.2f} | {acc} | {per} | {cond} | {same} |")
    for row in (rows[0], next(r for r in rows if r["temperature"] != 0.0)):
        text = bytes(prompts[0] + row["outputs"][0]).decode("utf-8", errors="replace").replace("```", "` ` `")
        lines += ["", f"First prompt + {row['mode']} continuation at temperature {row['temperature']}:", "",
                  "```", text, "```"]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data, held, n_files = stdlib_bytes()
    cfg = model_config(args)
    model = DeepSeekV3(cfg)
    params = model.num_parameters()
    print(f"{n_files} files, {data.numel() / 1e6:.1f} MB train / {held.numel() / 1e6:.2f} MB held out; "
          f"{params['total_params'] / 1e6:.2f}M params + {params['mtp_params'] / 1e6:.2f}M MTP", flush=True)
    trained = train(model, data, held, args)
    tf = teacher_forced_acceptance(model, held, args)
    print(f"teacher-forced acceptance per depth: greedy {tf['greedy']}, T={args.temperature} {tf['sampled']}")
    quiet = QuietWaiter(args.wait_quiet)
    prompts = prompts_from(held, args.prompts, args.prompt_len, args.seed)
    rows = measure(model, prompts, args, quiet)
    text = report(args, cfg, n_files, data.numel(), trained, tf, prompts, rows, params, quiet.waited)
    print(text)
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = "" if out.exists() else ("# Speculative decoding benchmark results\n\n"
                                           "Written by `benchmarks/speculative.py`.\n\n")
        with out.open("a", encoding="utf-8") as f:
            f.write(header + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
