"""Causal attention in bf16 on the CPU, side by side: nanoseek's fused kernel (nanoseek.model.cpu_attention) vs
PyTorch's ``F.scaled_dot_product_attention`` (what transformers' default ``sdpa`` attention calls) and vs
nanoseek's explicit-score path (attention.causal_attention_lowp, its route before the kernel), alternating in one
process on the same inputs.

A benchmark, not a test.

  * Inputs: random bf16 q, k (B, T, H, d_k), v (B, T, H, d_v), DeepSeek-style head widths (default the ``bench``
    and ``demo`` presets' 48 and 32). SDPA gets them transposed to (B, H, T, d); its CPU flash kernel needs equal
    key and value widths, so v is zero-padded to d_k (as nanoseek did before; with unequal widths SDPA falls back
    to its slower math path). The explicit path runs only where its scores fit its budget
    (attention.LOWP_SCORES_BUDGET), as in nanoseek.
  * Each case times the forward alone (no autograd) and forward + backward (gradients of q, k, v for a fixed
    output gradient); implementations alternate repetition by repetition, the first one rotating, with a 64 MiB
    buffer written between calls so no operand starts in the cache; the median is reported. The outputs are
    compared with nanoseek's (max abs difference).
  * Freed memory is kept for reuse (nanoseek.allocator), as in training.

Results are printed and appended, as a dated section, to benchmarks/results/attention_cpu.md.

Usage (from the repository root, with the venv active)::

    python benchmarks/attention_cpu.py
    python benchmarks/attention_cpu.py --cases 4x512x16,1x4096x16 --reps 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from nanoseek.allocator import keep_freed_memory  # noqa: E402
from nanoseek.model import attention, cpu_attention  # noqa: E402
from train_step import machine_info  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="4x512x16,1x4096x16,1x16384x8",
                   help="comma list of BxTxH (batch x tokens x heads)")
    p.add_argument("--dk", type=int, default=48, help="query / key width per head")
    p.add_argument("--dv", type=int, default=32, help="value width per head")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per implementation and case")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--out", default=str(HERE / "results" / "attention_cpu.md"))
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    try:
        args.cases = [tuple(int(n) for n in c.split("x")) for c in args.cases.split(",")]
        assert all(len(c) == 3 and min(c) > 0 for c in args.cases)
    except (ValueError, AssertionError):
        p.error(f"--cases wants BxTxH entries, e.g. 4x512x16, got {args.cases!r}")
    if not cpu_attention.shapes_supported(args.dk, args.dv):
        p.error("--dk and --dv must be multiples of 16 (the kernel's vectors)")
    return args


def implementations(B: int, T: int, H: int, dk: int, dv: int) -> dict:
    """name -> f(q, k, v, scale) -> (B, T, H, dv), for the inputs in (B, T, H, d)."""
    impls = {"nanoseek kernel": cpu_attention.causal_attention}

    def sdpa(q, k, v, scale):
        v = F.pad(v, (0, dk - dv))  # the flash kernel's equal widths
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           scale=scale)  # (B, H, T, dk)
        return o[..., :dv].transpose(1, 2)

    impls["F.sdpa (flash)"] = sdpa
    if B * H * T * T <= attention.LOWP_SCORES_BUDGET:
        def explicit(q, k, v, scale):
            return attention.causal_attention_lowp(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   scale).transpose(1, 2)

        impls["explicit scores"] = explicit
    return impls


def run_case(B: int, T: int, H: int, args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    q, k = ((torch.randn(B, T, H, args.dk, generator=g) * 1.5).bfloat16() for _ in range(2))
    v, d_out = (torch.randn(B, T, H, args.dv, generator=g).bfloat16() for _ in range(2))
    scale = args.dk ** -0.5
    impls = implementations(B, T, H, args.dk, args.dv)
    flush = torch.empty(64 << 20, dtype=torch.uint8)
    times = {(n, m): [] for n in impls for m in ("forward", "forward + backward")}
    outputs = {}

    def once(name, f, mode):
        if mode == "forward":
            with torch.no_grad():
                outputs[name] = f(q, k, v, scale)
        else:
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            f(*leaves, scale).backward(d_out)

    names = list(impls)
    for rep in range(args.reps + 1):  # the first round warms up
        order = names[rep % len(names):] + names[: rep % len(names)]
        for mode in ("forward", "forward + backward"):
            for name in order:
                flush.add_(1)
                t0 = time.perf_counter()
                once(name, impls[name], mode)
                if rep:
                    times[(name, mode)].append(time.perf_counter() - t0)
        print(f"  {B}x{T}x{H}: round {rep}/{args.reps}", flush=True)
    ref = outputs["nanoseek kernel"].float()
    rows = []
    for name in names:
        row = {"case": f"{B} x {T} x {H}", "impl": name,
               "max_diff": (outputs[name].float() - ref).abs().max().item()}
        for mode in ("forward", "forward + backward"):
            row[mode] = statistics.median(times[(name, mode)])
        rows.append(row)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_attention.available():
        sys.exit("attention_cpu.py: the fused kernel does not run here (it needs Linux on an x86 CPU with AVX-512 "
                 "bf16 and a C++ compiler; NANOSEEK_CPU_KERNELS=0 switches it off)")
    keep_freed_memory()
    machine = machine_info(args, torch.device("cpu"))
    rows = []
    for B, T, H in args.cases:
        rows += run_case(B, T, H, args)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {stamp}: causal attention, bf16, d_k = {args.dk}, d_v = {args.dv}", "",
             f"Command: `python benchmarks/attention_cpu.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
             "",
             f"Machine: {machine['cpu']}; {machine['cores']} cores, {machine.get('ram_gib', '?')} GiB RAM; torch "
             f"{machine['torch']}, python {machine['python']}; {machine['threads']} intra-op threads; nanoseek git "
             f"{machine['git']}.", "",
             "| B x T x H | implementation | forward (ms) | vs kernel | forward + backward (ms) | vs kernel | "
             "max abs diff of the output vs the kernel |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["case"] == row["case"] and r["impl"] == "nanoseek kernel")
        lines.append(f"| {row['case']} | {row['impl']} | {row['forward'] * 1e3:,.1f} | "
                     f"{row['forward'] / base['forward']:.2f}x | {row['forward + backward'] * 1e3:,.1f} | "
                     f"{row['forward + backward'] / base['forward + backward']:.2f}x | {row['max_diff']:.4f} |")
    lines += ["", f"Medians of {args.reps} repetitions, alternating, a 64 MiB buffer written before each call; "
              "'vs kernel' is the time relative to nanoseek's kernel (above 1: slower).", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = "" if out.exists() else ("# Causal attention on the CPU, bf16: nanoseek's fused kernel vs PyTorch\n\n"
                                           "Appended by `benchmarks/attention_cpu.py` (see its docstring). Newest "
                                           "sections at the bottom.\n\n")
        with out.open("a") as f:
            f.write(header + text + "\n")


if __name__ == "__main__":
    main()
