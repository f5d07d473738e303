"""nanoseek's two bf16 training modes side by side (recorded, not asserted): ``--dtype bf16`` (autocast, fp32
weights: each weight cast to bf16 in every forward, each gradient back to fp32 in every backward) against
``--dtype bf16-weights`` (bf16 weights and gradients, fp32 master copies stepped by AdamW).

Same initial weights, same batches, fused AdamW on both, steps alternating in one process; median step times.

    python benchmarks/mixed_precision.py [--preset bench] [--steps 6] [--out benchmarks/results/train_step.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path

import torch

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.objectives import training_loss
from nanoseek.train.precision import MasterWeights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode (after one warm-up)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_step.md"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset).replace(num_nextn_predict_layers=0)
    autocast_model = DeepSeekV3(cfg)
    cast_model = DeepSeekV3(cfg)
    cast_model.load_state_dict(autocast_model.state_dict())
    masters = MasterWeights(cast_model)
    opt_a = torch.optim.AdamW(autocast_model.parameters(), lr=1e-4, fused=True)
    opt_m = torch.optim.AdamW([q for _, q in masters.named_parameters()], lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
               for _ in range(args.steps + 1)]

    def step_autocast(ids: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = autocast_model.forward_train(ids[:, :-1])
        loss = training_loss(out, ids[:, 1:]).total
        loss.backward()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        return loss.item()

    def step_master(ids: torch.Tensor) -> float:
        loss = training_loss(cast_model.forward_train(ids[:, :-1]), ids[:, 1:]).total
        loss.backward()
        opt_m.step()
        masters.copy_to_model()
        opt_m.zero_grad(set_to_none=True)
        return loss.item()

    times: dict[str, list[float]] = {"autocast": [], "bf16-weights": []}
    losses: dict[str, list[float]] = {"autocast": [], "bf16-weights": []}
    modes = [("autocast", step_autocast), ("bf16-weights", step_master)]
    for i, ids in enumerate(batches):
        for name, fn in (modes if i % 2 == 0 else modes[::-1]):
            t = time.perf_counter()
            losses[name].append(fn(ids))
            if i:
                times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    tok = args.batch * args.seq
    lines = [f"\n## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: nanoseek bf16 modes, {args.preset}, "
             f"{args.batch} x {args.seq} tokens", "",
             f"Command: `python benchmarks/mixed_precision.py --preset {args.preset}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads. Fused AdamW on both; steps alternating; medians of {args.steps}.", "",
             "| mode | median step (s) | tokens/s | speedup | losses |", "|---|---|---|---|---|"]
    for name in times:
        lines.append(f"| `--dtype {'bf16' if name == 'autocast' else name}` | {med[name]:.2f} | {tok / med[name]:.0f} | "
                     f"{med['autocast'] / med[name]:.2f}x | {' '.join(f'{x:.4f}' for x in losses[name])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "a") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
