"""Decode at long context, side by side: nanoseek (absorbed MLA over its latent cache) vs transformers'
DeepseekV3ForCausalLM (its default ``DynamicCache``), same weights, batch 1, alternating in one process.

A benchmark, not a test.

  * Same weights: a random nanoseek model of the ``--preset`` (default ``bench``) with ``num_nextn_predict_layers=0``
    and ``max_position_embeddings`` raised to fit the longest context is saved with ``nanoseek.hf.save_pretrained``
    and read back by ``nanoseek.hf.load_pretrained`` and ``AutoModelForCausalLM.from_pretrained``.
  * Context fill: the same random token ids on both sides, prefilled in ``--chunk``-token forwards (nanoseek:
    ``forward_cached(absorb=False)``, the up-projected path; transformers: ``model(input_ids, cache=...)``). The
    last-position logits of both are compared (max abs difference) as a check that both hold the same context.
  * Decode: ``--steps`` greedy tokens per round (forward of one token, output head, argmax) from the same first
    token; nanoseek ``forward_cached`` (absorbed attention, writes at explicit slots, so a round is repeated by
    simply writing the same slots again), transformers ``model(input_ids, cache=...)`` then ``cache.crop``. The
    two implementations alternate round by round (the first one rotates); ``--warmup`` rounds are discarded and
    the median round gives ms/token. Both sides must produce the same greedy tokens.
  * Cache bytes: nanoseek's ``LatentCache.main_nbytes`` (allocated for context + steps), checked to be exactly
    (kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes per token; transformers': the bytes of the tensors
    in its ``DynamicCache`` after the prefill, per context token.
  * A shared machine: before each timed round the script waits (within ``--wait-quiet`` seconds in total) for
    other processes to leave the CPUs idle, and records the share of the CPUs they used during each round.

Results are printed and appended, as a dated section, to benchmarks/results/decode.md.

Usage (from the repository root, with the venv active)::

    python benchmarks/decode.py                                   # 1K, 4K, 16K; bench preset; fp32
    python benchmarks/decode.py --contexts 1024,4096 --steps 8 --rounds 2
    python benchmarks/decode.py --preset deepseek-v2-lite --layers 3 --dtype bf16 --contexts 1024,4096 --threads 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import QuietWaiter, cpu_busy_seconds, loadavg, machine_info  # noqa: E402  (shared helpers)

from nanoseek import DeepSeekV3, ModelConfig  # noqa: E402
from nanoseek.hf import load_pretrained, save_pretrained  # noqa: E402
from nanoseek.inference import LatentCache  # noqa: E402
from nanoseek.inference.compiled import main_step  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "decode.md"
IMPLS = ("nanoseek", "transformers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--layers", type=int, default=None,
                   help="num_hidden_layers instead of the preset's (e.g. the first 3 layers of deepseek-v2-lite)")
    p.add_argument("--contexts", default="1024,4096,16384", help="comma list of context lengths (tokens)")
    p.add_argument("--steps", type=int, default=16, help="decode tokens per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per implementation and context")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds per implementation and context")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two OpenMP threads stall on every "
                        "small op whenever another process takes a core; both sides get the same setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-quiet", type=float, default=120.0,
                   help="seconds in total to wait for idle CPUs before rounds (0: never wait)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--compile", action="store_true",
                   help="nanoseek decodes through its compiled step (generate(compile=True)); warmup rounds compile")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--note", default="")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: the process keeps freed memory for reuse, as `nanoseek generate` does on the CPU "
                        "(nanoseek/allocator.py; it applies to both implementations); default: glibc's defaults")
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    return args


class Side:
    """One implementation: fill its cache with a context, then time greedy decode rounds from it."""

    def __init__(self, name: str, model: torch.nn.Module):
        self.name, self.model = name, model
        self.round_s: list[float] = []
        self.others: list[float] = []
        self.tokens: list[list[int]] = []

    # -------------------------------------------------------------- context
    def prefill(self, ids: torch.Tensor, steps: int, chunk: int) -> torch.Tensor:
        """Fill the cache with ids (1, T) in chunks; return the last position's logits (V,)."""
        T = ids.shape[1]
        self.context = T
        if self.name == "nanoseek":
            self.cache = LatentCache.for_model(self.model, 1, T + steps)  # sized to the request
            for s in range(0, T, chunk):
                pos = torch.arange(s, min(s + chunk, T))[None]
                hidden = self.model.forward_cached(ids[:, s: s + chunk], pos, self.cache, absorb=False)
            return self.model.lm_head(hidden[0, -1]).float()
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        for s in range(0, T, chunk):
            out = self.model(input_ids=ids[:, s: s + chunk], cache=self.cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits[0, -1].float()

    def cache_bytes(self) -> int:
        if self.name == "nanoseek":
            return self.cache.main_nbytes
        total = 0
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def cache_slots(self) -> int:
        return self.cache.max_length if self.name == "nanoseek" else self.context

    # -------------------------------------------------------------- decode
    def decode_round(self, first: int, steps: int) -> list[int]:
        """``steps`` greedy tokens after the context, starting from token ``first``; the cache is left as found."""
        tok, out = torch.tensor([[first]]), []
        for i in range(steps):
            if self.name == "nanoseek":
                pos = torch.tensor([[self.context + i]])
                if getattr(self, "compiled", False):
                    logits = main_step(self.model, tok, pos, self.cache)[1][:, -1]
                else:
                    logits = self.model.lm_head(self.model.forward_cached(tok, pos, self.cache)[:, -1])
            else:
                logits = self.model(input_ids=tok, cache=self.cache, use_cache=True).logits[:, -1]
            tok = logits.argmax(-1, keepdim=True)
            out.append(int(tok))
        if self.name != "nanoseek":
            self.cache.crop(-steps)  # transformers' cache grows; nanoseek just rewrites the same slots next round
        return out


def load_sides(cfg: ModelConfig, args, directory: Path) -> list[Side]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    save_pretrained(DeepSeekV3(cfg), directory)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ns = load_pretrained(directory, dtype=dtype).eval()
    hf, loading = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in loading.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"transformers did not load the checkpoint cleanly: {bad}")
    hf.eval()
    with torch.no_grad():  # own memory, not a view of the safetensors mmap
        for p in hf.parameters():
            p.data = p.data.clone()
    info = f"{type(hf).__name__}, attn={hf.config._attn_implementation}, experts={hf.config._experts_implementation}"
    sides = [Side("nanoseek", ns), Side("transformers", hf)]
    sides[0].compiled = args.compile
    sides[1].info = info
    return sides


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.malloc == "keep":
        from nanoseek.allocator import keep_freed_memory

        keep_freed_memory("cpu")
    base = ModelConfig.preset(args.preset)
    if args.layers is not None:
        base = base.replace(num_hidden_layers=args.layers)
    cfg = base.replace(num_nextn_predict_layers=0,
                       max_position_embeddings=max(base.max_position_embeddings, max(args.contexts) + args.steps))
    elsize = 2 if args.dtype == "bf16" else 4
    expected_per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * elsize
    quiet = QuietWaiter(args.wait_quiet)
    results = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        sides = load_sides(cfg, args, Path(tmp))
        for ctx in args.contexts:
            g = torch.Generator().manual_seed(args.seed + ctx)
            ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=g)
            row = {"context": ctx, "prefill_s": {}, "cache_bytes": {}, "bytes_per_token": {}}
            logits = {}
            for side in sides:
                side.round_s, side.others, side.tokens = [], [], []
                t0 = time.perf_counter()
                logits[side.name] = side.prefill(ids, args.steps, args.chunk)
                row["prefill_s"][side.name] = time.perf_counter() - t0
                row["cache_bytes"][side.name] = side.cache_bytes()
                row["bytes_per_token"][side.name] = side.cache_bytes() / side.cache_slots()
                print(f"[{ctx}] {side.name}: prefill {row['prefill_s'][side.name]:.1f} s, cache "
                      f"{side.cache_bytes() / 2**20:.2f} MiB", flush=True)
            per_token = row["cache_bytes"]["nanoseek"] / (ctx + args.steps)
            assert per_token == expected_per_token, (per_token, expected_per_token)
            row["logits_max_abs_diff"] = float((logits["nanoseek"] - logits["transformers"]).abs().max())
            first = int(logits["nanoseek"].argmax())
            for r in range(args.warmup + args.rounds):
                order = sides if r % 2 == 0 else sides[::-1]
                for side in order:
                    quiet()
                    b0, c0, t0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
                    toks = side.decode_round(first, args.steps)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    if r >= args.warmup:
                        side.round_s.append(wall)
                        side.others.append(max(0.0, cpu_busy_seconds() - b0 - cpu) / (wall * (os.cpu_count() or 1)))
                    side.tokens.append(toks)
            row["same_tokens"] = all(t == sides[0].tokens[0] for s in sides for t in s.tokens)
            for side in sides:
                ms = statistics.median(side.round_s) / args.steps * 1e3
                row[side.name] = {"ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                                  "all_ms_per_token": [t / args.steps * 1e3 for t in side.round_s],
                                  "others_max": max(side.others)}
            row["speedup"] = row["transformers"]["ms_per_token"] / row["nanoseek"]["ms_per_token"]
            print(f"[{ctx}] decode: nanoseek {row['nanoseek']['tokens_per_s']:.1f} tok/s, transformers "
                  f"{row['transformers']['tokens_per_s']:.1f} tok/s, speedup {row['speedup']:.2f}x, same tokens "
                  f"{row['same_tokens']}, logits diff {row['logits_max_abs_diff']:.2e}", flush=True)
            results.append(row)
            for side in sides:
                side.cache = None
        hf_info = sides[1].info
    return {"cfg": cfg, "rows": results, "expected_per_token": expected_per_token, "hf_info": hf_info,
            "waited": quiet.waited}


def report(args, res: dict) -> str:
    cfg = res["cfg"]
    info = machine_info(args, torch.device("cpu"))
    lines = [f"## {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} - decode, {args.preset} preset, {args.dtype}", "",
             f"Command: `python benchmarks/decode.py {' '.join(sys.argv[1:])}`", ""]
    lines.append(f"- Machine: {info['cpu']}, {info['cores']} cores, {info.get('ram_gib', '?')} GiB RAM, "
                 f"torch {info['torch']} ({args.threads} threads), transformers {info['transformers']}, "
                 f"git {info['git']}; load average after the run {loadavg()}")
    lines.append(f"- Model: `{args.preset}` preset with num_nextn_predict_layers=0, max_position_embeddings="
                 f"{cfg.max_position_embeddings}: {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense), "
                 f"d={cfg.hidden_size}, {cfg.num_attention_heads} heads, d_c={cfg.kv_lora_rank}, "
                 f"d_R={cfg.qk_rope_head_dim}, {cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok} "
                 f"+ {cfg.n_shared_experts} shared, vocab {cfg.vocab_size}; random weights, batch 1")
    lines.append(f"- transformers: default DynamicCache ({res['hf_info']})."
                 + (" DeepseekV3ForCausalLM caches the compressed latent too (its attention updates the cache with "
                    "kv_nope / k_rot before `expand_kv`), so both caches hold (d_c + d_R) per token per layer; but "
                    "every decode step it re-expands the whole cached latent through kv_b_proj to per-head K and V "
                    "(S x d_c x H x (d_h + d_v) multiply-adds per layer), which the absorbed path never does: that "
                    "is the growing gap with context." if res["hf_info"].startswith("DeepseekV3") else
                    " What it caches per token is in the table."))
    lines.append(f"- Decode: {args.steps} greedy tokens per round, {args.rounds} timed rounds (+{args.warmup} "
                 f"warmup) per side, alternating; median round. Prefill in {args.chunk}-token chunks. Allocator: "
                 f"{'freed memory kept for reuse (--malloc keep), for both' if args.malloc == 'keep' else 'glibc defaults'}. "
                 f"Waited {res['waited']:.0f} s in total for idle CPUs."
                 + (" nanoseek decodes through its torch.compile'd step (`--compile`, generate(compile=True)); "
                    "the warmup rounds compile it." if args.compile else ""))
    lines.append(f"- Expected latent cache bytes per token: (d_c + d_R) x layers x dtype bytes = "
                 f"({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}) x {cfg.num_hidden_layers} x "
                 f"{2 if args.dtype == 'bf16' else 4} = {res['expected_per_token']}")
    if args.note:
        lines.append(f"- Note: {args.note}")
    lines += ["", "| context | nanoseek tok/s | transformers tok/s | speedup | nanoseek cache B/token | "
                  "transformers cache B/token | nanoseek cache MiB | prefill s (ns / hf) | same tokens | "
                  "last-logit diff | max CPU share of others |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['context']} | {r['nanoseek']['tokens_per_s']:.1f} | {r['transformers']['tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['bytes_per_token']['nanoseek']:.0f} | "
            f"{r['bytes_per_token']['transformers']:.0f} | {r['cache_bytes']['nanoseek'] / 2**20:.2f} | "
            f"{r['prefill_s']['nanoseek']:.1f} / {r['prefill_s']['transformers']:.1f} | {r['same_tokens']} | "
            f"{r['logits_max_abs_diff']:.1e} | "
            f"{max(r['nanoseek']['others_max'], r['transformers']['others_max']):.2f} |")
    lines.append("")
    lines.append("ms/token per timed round: " + "; ".join(
        f"{r['context']}: nanoseek {', '.join(f'{x:.1f}' for x in r['nanoseek']['all_ms_per_token'])} / "
        f"transformers {', '.join(f'{x:.1f}' for x in r['transformers']['all_ms_per_token'])}" for r in res["rows"]))
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    res = run(args)
    text = report(args, res)
    print(text)
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = "" if out.exists() else "# Decode benchmark results\n\nWritten by `benchmarks/decode.py`.\n\n"
        with out.open("a", encoding="utf-8") as f:
            f.write(header + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
