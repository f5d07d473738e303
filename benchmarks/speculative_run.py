"""MTP speculative decoding on a trained run (e.g. the demo): tokens/s with and without speculation, the
acceptance rate, and where a decode step's time goes.

A benchmark, not a test. Prompts: the first ``--prompt-tokens`` tokens of held-out standard-library files
(the validation split of the run's corpus is by file; these are taken from the end of the sorted file list).
Plain and speculative decoding run back to back per prompt (the first mode alternating), batch 1, greedy and
sampled. Then each piece of a decode step is timed alone on the same context: the main model on 1 token
(a plain step) and on 1 + D tokens (a verify step), an MTP module on its 2D-position window, and the output
head — the pieces a speculative step adds up to.

    python benchmarks/speculative_run.py runs/demo [--new-tokens 128] [--out benchmarks/results/speculative.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import loadavg, machine_info  # noqa: E402

from nanoseek import generate  # noqa: E402
from nanoseek.hf import load_pretrained  # noqa: E402
from nanoseek.inference.cache import LatentCache  # noqa: E402
from nanoseek.inference.draft_head import DraftHead  # noqa: E402
from nanoseek.inference.speculative import verification_logits  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402


def prompts(tok: Tokenizer, n: int, length: int) -> list[list[int]]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[::-1]
    out = []
    for f in files:
        ids = tok.encode(f.read_text(errors="replace"))
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    return out


def timed_parts(model, context: int, reps: int = 50) -> dict[str, float]:
    """Milliseconds of each piece of a decode step at ``context`` tokens of cache."""
    D = len(model.mtp)
    cache = LatentCache.for_model(model, 1, context + 8, mtp=True)
    ids = torch.randint(2, model.config.vocab_size, (1, context + 4))
    pos = torch.arange(context + 4)[None]
    h = model.forward_cached(ids[:, :context], pos[:, :context], cache, absorb=False)
    for k in range(1, D + 1):
        model.mtp_forward_cached(k, h[:, : context - k], ids[:, k:context], pos[:, : context - k], cache, absorb=False)

    def ms(fn) -> float:
        for _ in range(3):
            fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3

    W = 2 * max(D, 1)
    hh = h[:, -W:]
    draft_head = DraftHead(model.lm_head.weight)
    return {
        "main, 1 token": ms(lambda: model.forward_cached(ids[:, context:context + 1], pos[:, context:context + 1], cache)),
        f"main, {D + 1} tokens (verify)": ms(lambda: model.forward_cached(ids[:, context:context + D + 1],
                                                                        pos[:, context:context + D + 1], cache)),
        f"MTP module 1, {W} positions, output at the last": ms(lambda: model.mtp_forward_cached(
            1, hh, ids[:, context - W + 1:context + 1], pos[:, context - W:context], cache,
            outputs_at=torch.full((1, 1), W - 1))),
        "output head, 1 position (plain)": ms(lambda: model.lm_head(h[:, -1:])),
        f"output head, {D + 1} positions (verify)": ms(lambda: verification_logits(model.lm_head.weight, h[:, -D - 1:])),
        "draft head (int8), 1 position": ms(lambda: draft_head(h[:, -1])),
    }


def step_bytes(model, tok: Tokenizer, tokens: int = 512) -> dict[str, float]:
    """MB of weights a decode step reads at batch 1, counted from the parameters (bytes of the model dtype): a
    plain step (every non-expert weight but the embedding table, K experts per MoE layer, the head); a
    verification of 2 tokens (the distinct experts of two consecutive tokens, averaged over the routing of
    ``tokens`` tokens of a stdlib file); a speculative step (the verification, the MTP module with K experts,
    the int8 draft head). The most a memory-bound step could gain is tokens-per-step / (speculative / plain)."""
    cfg, size = model.config, model.embed_tokens.weight.element_size()
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size
    distinct: list[int] = []

    def record(module, inputs, output):
        idx = output[1].tolist()  # (T, K) expert ids
        distinct.extend(len(set(a) | set(b)) for a, b in zip(idx, idx[1:]))

    hooks = [layer.mlp.gate.register_forward_hook(record) for layer in model.layers if layer.is_moe]
    text = Path(sysconfig.get_paths()["stdlib"], "zipfile", "__init__.py")
    text = text if text.exists() else Path(sysconfig.get_paths()["stdlib"], "zipfile.py")
    with torch.no_grad():
        model(torch.tensor([tok.encode(text.read_text())[:tokens]]))
    for h in hooks:
        h.remove()
    pair = sum(distinct) / len(distinct)
    K, head = cfg.num_experts_per_tok, model.lm_head.weight.numel()
    fixed = [numel(layer) - (numel(layer.mlp.experts) if layer.is_moe else 0) for layer in model.layers]
    moe = sum(layer.is_moe for layer in model.layers)
    plain = sum(fixed) + moe * K * expert + head + numel(model.norm)
    verify = plain + moe * (pair - K) * expert
    mtp = sum(numel(m) - numel(m.block.mlp.experts) + K * expert for m in model.mtp)
    spec = verify + mtp + head / size  # int8 draft head: one byte per weight
    return {"distinct experts, 2 tokens": pair, "plain MB": plain * size / 1e6, "verify MB": verify * size / 1e6,
            "speculative MB": spec * size / 1e6, "speculative / plain": spec / plain}


def command_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The options of this run that differ from their defaults (--passes always), as they would be typed, so
    that the recorded command reproduces the run (--out and --no-write left out)."""
    out = ""
    for name, value in vars(args).items():  # in the parser's order
        if name in ("run_dir", "out", "no_write") or (name != "passes" and value == parser.get_default(name)):
            continue
        flag = f" --{name.replace('_', '-')}"
        out += flag if value is True else f"{flag} {value}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--passes", type=int, default=6, help="passes over the prompts (each mode, alternating)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "speculative.md"))
    p.add_argument("--compile", action="store_true", help="generate(compile=True): torch.compile'd decoding steps")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.run_dir).eval()
    tok = Tokenizer.from_pretrained(args.run_dir)
    ps = prompts(tok, args.prompts, args.prompt_tokens)
    load_before = loadavg()
    rows = []
    with torch.inference_mode():
        if args.compile:  # compile every step first (not timed): plain and speculative, greedy and sampled
            start = time.perf_counter()
            for spec in (False, True):
                for temperature in (0.0, 0.7):
                    generate(model, [ps[0]], args.new_tokens, temperature=temperature, seed=0, speculative=spec,
                             compile=True)
            print(f"compiled the decoding steps in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        for temperature in (0.0, 0.7):
            totals = {False: [0, 0.0], True: [0, 0.0]}
            per_pass = []  # speedup of each pass over the prompts: the spread shows the machine's noise
            drafted = accepted = 0
            same = True
            for i, prompt in enumerate(ps * args.passes):
                if i % len(ps) == 0:
                    pass_start = {s: list(totals[s]) for s in totals}
                outs = {}
                for spec in ((False, True) if i % 2 == 0 else (True, False)):
                    r = generate(model, [prompt], args.new_tokens, temperature=temperature, seed=i % len(ps), speculative=spec,
                                 compile=args.compile)
                    totals[spec][0] += r.stats.new_tokens - 1
                    totals[spec][1] += r.stats.decode_s
                    outs[spec] = r.tokens[0]
                    if spec:
                        drafted += r.stats.drafted
                        accepted += r.stats.accepted
                same &= temperature > 0 or outs[True] == outs[False]
                if i % len(ps) == len(ps) - 1:
                    rate = {s: (totals[s][0] - pass_start[s][0]) / (totals[s][1] - pass_start[s][1]) for s in totals}
                    per_pass.append(rate[True] / rate[False])
            plain, spec = (totals[s][0] / totals[s][1] for s in (False, True))
            rows.append((temperature, plain, spec, spec / plain, statistics.median(per_pass), min(per_pass),
                         max(per_pass), accepted / max(drafted, 1), same))
            print(f"T={temperature}: plain {plain:.1f} tok/s, speculative {spec:.1f} tok/s ({spec / plain:.2f}x, "
                  f"per pass {min(per_pass):.2f}-{max(per_pass):.2f}x), acceptance {accepted / max(drafted, 1):.2f}",
                  file=sys.stderr)
        parts = timed_parts(model, args.prompt_tokens + args.new_tokens // 2)
    weights = step_bytes(model, tok)
    cfg = model.config
    lines = [f"\n## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC - trained run `{args.run_dir}`", "",
             f"Command: `python benchmarks/speculative_run.py {args.run_dir}{command_options(p, args)}`", "",
             f"- Machine: {machine_info(args, torch.device('cpu'))}; {args.threads} thread(s); load average before {load_before}, after "
             f"{loadavg()}",
             f"- Model: d={cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocabulary {cfg.vocab_size}, "
             f"{cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok}, D={len(model.mtp)} MTP module(s)",
             f"- Decode: {len(ps)} held-out stdlib prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
             f"tokens, batch 1, plain and speculative back to back per prompt (first mode alternating), "
             f"{args.passes} passes; tok/s = all new tokens after the first / all decode time", "",
             "| temperature | plain tok/s | speculative tok/s | speedup | per pass: median (min-max) | acceptance "
             "| greedy = plain |",
             "|---|---|---|---|---|---|---|"]
    for t, plain, spec, ratio, median, low, high, acc, same in rows:
        lines.append(f"| {t} | {plain:.1f} | {spec:.1f} | {ratio:.2f}x | {median:.2f}x ({low:.2f}-{high:.2f}) | "
                     f"{acc:.2f} | {same if t == 0 else '-'} |")
    lines += ["", "Pieces of a decode step timed alone (ms): " + "; ".join(f"{k} {v:.2f}" for k, v in parts.items())]
    lines += ["", "Weights read per decode step (see step_bytes): " + "; ".join(f"{k} {v:.2f}" for k, v in weights.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
