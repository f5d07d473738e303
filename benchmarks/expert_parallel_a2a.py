"""All-to-all volume of expert parallelism with and without node-limited routing (recorded, not asserted).

EP=4 gloo CPU processes, one expert group per rank (as V3 maps one group to one node), K=8 of 32 routed
experts. For topk_group = 1, 2, 3 and 4 (= no limit) it measures, over a few training steps of a small
model on random tokens: the ranks each token is sent to, the rows and bytes sent to other ranks, the rows a
per-expert dispatch would send (K per token), and the step time.

    python benchmarks/expert_parallel_a2a.py [--out benchmarks/results/expert_parallel_a2a.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from nanoseek.atomic import atomic_write_text
from nanoseek.config import ModelConfig
from nanoseek.distributed.spawn import run_spawned

EP = 4


def config(topk_group: int) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(
        hidden_size=128, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=32, num_experts_per_tok=8,
        n_group=EP, topk_group=topk_group, moe_intermediate_size=64, vocab_size=512, num_nextn_predict_layers=0)


def worker(rank: int, world: int, topk_group: int, steps: int, batch: int, seq: int) -> dict:
    from nanoseek.distributed.expert_parallel import apply_expert_parallel
    from nanoseek.model import DeepSeekV3
    from nanoseek.objectives import training_loss

    torch.manual_seed(0)
    model = DeepSeekV3(config(topk_group))
    stats = apply_expert_parallel(model, torch.distributed.group.WORLD)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1 + rank)
    times = []
    stats.reset()
    for _ in range(steps):
        ids = torch.randint(0, 512, (batch, seq + 1), generator=gen)
        t0 = time.perf_counter()
        loss = training_loss(model.forward_train(ids[:, :-1]), ids[:, 1:]).total
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    d = stats.as_dict()
    d["step_s"] = sorted(times)[len(times) // 2]
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "expert_parallel_a2a.md"),
                   help="markdown file the table replaces (default benchmarks/results/expert_parallel_a2a.md)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args()
    rows = []
    for tg in (1, 2, 3, 4):
        res = run_spawned(worker, EP, tg, args.steps, args.batch, args.seq, timeout_s=300)
        tot = {k: sum(r[k] for r in res) for k in ("a2a_tokens", "a2a_rows", "a2a_remote_rows", "a2a_remote_bytes",
                                                    "a2a_slots")}
        step_s = max(r["step_s"] for r in res)
        rows.append((tg, tot["a2a_rows"] / tot["a2a_tokens"], max(r["a2a_max_ranks_per_token"] for r in res),
                     tot["a2a_remote_rows"] / tot["a2a_tokens"], tot["a2a_slots"] / tot["a2a_tokens"],
                     tot["a2a_remote_bytes"] / 2**20, step_s))
        print(f"topk_group {tg}: {rows[-1][1]:.2f} ranks/token (max {rows[-1][2]}), {rows[-1][3]:.2f} remote "
              f"rows/token, {rows[-1][5]:.1f} MiB remote, {step_s * 1e3:.0f} ms/step", file=sys.stderr)
    base = rows[-1][5]
    lines = [
        "# Expert-parallel all-to-all volume: node-limited routing", "",
        f"Command: `python benchmarks/expert_parallel_a2a.py` ({EP} gloo CPU processes, EP={EP}, "
        f"{args.steps} training steps of {args.batch} x {args.seq} tokens per rank, 2 MoE layers (hidden 128), "
        "32 routed experts in 4 groups (one group per rank), top-8).",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{platform.python_version()}.", "",
        "Dispatch sends each token once per destination rank (with the gate values of the experts it selected "
        "there); the combine returns the same rows. A per-expert dispatch would send K = 8 rows per token. "
        "Bytes are the forward dispatch's hidden states sent to other ranks (fp32), all layers and ranks.", "",
        "| topk_group (ranks allowed) | ranks per token (mean) | max | remote rows per token | rows per token, "
        "per-expert dispatch | remote MiB | vs no limit | step time (ms, slowest rank median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tg, rpt, mx, remote, slots, mib, step_s in rows:
        lines.append(f"| {tg}{' (no limit)' if tg == EP else ''} | {rpt:.2f} | {mx} | {remote:.2f} | {slots:.0f} | "
                     f"{mib:.1f} | {mib / base:.2f}x | {step_s * 1e3:.0f} |")
    lines += ["", "Step times on a 2-core machine running 4 processes are dominated by CPU sharing; the volumes "
              "are exact counts."]
    print("\n".join(lines))
    if not args.no_write:
        atomic_write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
