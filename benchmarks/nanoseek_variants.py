"""What would make nanoseek's training step faster? Candidate changes measured in-process, not committed.

Each variant is applied at run time to the unmodified package (a wrapper, a replacement method or a backend
switch; nothing under nanoseek/ is edited) and timed against the baseline on the same model, alternating step by
step like benchmarks/train_step.py. Variants:

  baseline          nanoseek as it is; AdamW with torch's default implementation (the for-loop one on CPU)
  fused-adamw       torch.optim.AdamW(fused=True): one fused kernel per parameter instead of ~10 elementwise
                    passes over parameters, gradients and moments
  experts-dispatch  (historical: written against the dispatch of an earlier commit, without the bf16 padding of
                    experts.PAD_ROWS) RoutedExperts.forward with a cheaper dispatch and combine: gather the token
                    rows with index_select (its backward is index_add_, not the accumulating index_put_ of x[idx]),
                    multiply the gate weights in the compute dtype, and combine by un-sorting (index_select with
                    the inverse permutation) and summing the k rows of each token (view(T, K, D).sum(1)) instead of
                    index_add_ into zeros; the grouped matmuls are unchanged
  all               fused-adamw + experts-dispatch
  math-sdpa         undo the padded-v change of d86a0b7: force SDPA's math backend (what unequal q/k and v head
                    dims got before), to show what the fused CPU kernel is worth (fp32; in bf16 on the CPU training
                    attention no longer goes through SDPA, see causal_attention_lowp, so this changes nothing there)
  fp32-experts      (bf16 autocast only) undo the autocast cast in RoutedExperts: run the routed experts in fp32
                    under autocast, as before that change, to show what it is worth

The first-batch loss of every variant is compared with the baseline's (forward only, same weights).

Usage::

    python benchmarks/nanoseek_variants.py                    # fp32
    python benchmarks/nanoseek_variants.py --dtype bf16       # bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_here = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_train_step", _here / "train_step.py")
ts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ts)

VARIANTS = ("baseline", "fused-adamw", "experts-dispatch", "all", "math-sdpa", "fp32-experts")


# ---------------------------------------------------------------------------------------------- patches
def experts_dispatch_forward(self, x_TD, weights_TK, idx_TK):
    """RoutedExperts.forward with index_select gather and an un-sort + sum combine (same math)."""
    from nanoseek.model.experts import _grouped_mm_ok

    T, K = idx_TK.shape
    D = x_TD.shape[-1]
    flat_idx = idx_TK.flatten()
    order = flat_idx.argsort(stable=True)  # slots sorted by expert
    counts_E = torch.bincount(flat_idx, minlength=self.n_experts)
    x_SD = x_TD.index_select(0, order // K)  # backward: index_add_ (the x[idx] backward is index_put_ accumulate)
    gate_up, down = self.gate_up_proj, self.down_proj
    if torch.is_autocast_enabled(x_TD.device.type):
        dtype = torch.get_autocast_dtype(x_TD.device.type)
        x_SD, gate_up, down = x_SD.to(dtype), gate_up.to(dtype), down.to(dtype)
    if _grouped_mm_ok(x_SD, gate_up, down):
        offsets = counts_E.cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(x_SD, gate_up.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
        y_SD = torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offsets)
    else:
        chunks = []
        for e, x_e in enumerate(x_SD.split(counts_E.tolist())):
            if x_e.shape[0]:
                gate, up = (x_e @ gate_up[e].T).chunk(2, dim=-1)
                chunks.append((F.silu(gate) * up) @ down[e].T)
        y_SD = torch.cat(chunks) if chunks else x_SD.new_zeros(0, D)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    y_TKD = (y_SD.index_select(0, inv) * weights_TK.reshape(-1, 1).to(y_SD.dtype)).view(T, K, D)
    return y_TKD.sum(1, dtype=torch.float32).to(x_TD.dtype), counts_E


@contextlib.contextmanager
def replace_experts_forward(fn):
    from nanoseek.model.moe import RoutedExperts

    orig = RoutedExperts.forward
    RoutedExperts.forward = fn
    try:
        yield
    finally:
        RoutedExperts.forward = orig


@contextlib.contextmanager
def fp32_experts():
    from nanoseek.model.moe import RoutedExperts

    orig = RoutedExperts.forward

    def forward(self, x_TD, weights_TK, idx_TK):
        with torch.autocast(x_TD.device.type, enabled=False):
            out, counts = orig(self, x_TD.float(), weights_TK, idx_TK)
        return out.to(x_TD.dtype), counts

    RoutedExperts.forward = forward
    try:
        yield
    finally:
        RoutedExperts.forward = orig


def patches(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    if name in ("experts-dispatch", "all"):
        stack.enter_context(replace_experts_forward(experts_dispatch_forward))
    if name == "math-sdpa":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    if name == "fp32-experts":
        stack.enter_context(fp32_experts())
    return stack


def optimizer_kind(name: str) -> str:
    return "fused" if name in ("fused-adamw", "all") else "default"


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--bf16-mode", choices=("autocast", "weights"), default="autocast")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-quiet", type=float, default=90.0)
    p.add_argument("--out", default=str(ts.DEFAULT_OUT))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")
    if not (args.dtype == "bf16" and args.bf16_mode == "autocast") and "fp32-experts" in args.variants:
        args.variants.remove("fp32-experts")  # the same as baseline without autocast
    args.device = "cpu"
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from nanoseek import DeepSeekV3, ModelConfig

    load_before = ts.loadavg()
    machine = ts.machine_info(args, device)
    cfg = ModelConfig.preset(args.preset).replace(num_nextn_predict_layers=0)
    torch.manual_seed(args.seed)
    model = DeepSeekV3(cfg).to(ts.weight_dtype(args))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    opts = {k: torch.optim.AdamW(params, fused=(k == "fused"), **kw)
            for k in {optimizer_kind(v) for v in args.variants}}
    batches = ts.make_batches(cfg, args, args.warmup + args.steps, device)
    print(f"machine: {machine}\nprecision: {ts.precision_label(args)}; variants: {', '.join(args.variants)}",
          flush=True)

    def loss_of(ids):
        with ts.autocast_ctx(args, device):
            logits = model(ids)
            return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())

    first = {}
    with torch.no_grad():
        for v in args.variants:
            with patches(v):
                first[v] = loss_of(batches[0]).item()
    ref = first["baseline"]
    for v in args.variants:
        print(f"first-batch loss {v:<17} {first[v]:.6f}  rel diff vs baseline {abs(first[v] - ref) / ref:.2e}",
              flush=True)

    quiet = ts.QuietWaiter(args.wait_quiet)
    times = {v: [] for v in args.variants}
    others = {v: [] for v in args.variants}
    for s, ids in enumerate(batches):
        order = args.variants[s % len(args.variants):] + args.variants[: s % len(args.variants)]
        for v in order:
            opt = opts[optimizer_kind(v)]
            if s >= args.warmup:
                quiet()
            t0, c0, b0 = time.perf_counter(), time.process_time(), ts.cpu_busy_seconds()
            with patches(v):
                loss = loss_of(ids)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            wall = time.perf_counter() - t0
            other = max(0.0, ts.cpu_busy_seconds() - b0 - (time.process_time() - c0)) / (wall * (os.cpu_count() or 1))
            if s >= args.warmup:
                times[v].append(wall)
                others[v].append(other)
            print(f"{'warmup' if s < args.warmup else 'step'} {s}: {v:<17} loss {loss.item():.5f}  {wall:.3f} s"
                  f"  (other processes {other:.0%})", flush=True)

    tokens = args.batch * args.seq
    flops = ts.flops_per_token(cfg, args.seq)
    base_med = statistics.median(times["baseline"])
    base_best = min(times["baseline"])
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ts.REPO)] + sys.argv[1:])
    lines = [f"## {now}: nanoseek variants (applied at run time, not in the package), {args.preset}, "
             f"{args.batch} x {args.seq} tokens, {ts.precision_label(args)}", "",
             f"Command: `{cmd}`", "",
             f"Machine: {machine['cpu']}; {machine['cores']} cores; torch {machine['torch']}; {machine['threads']} "
             f"threads; nanoseek git {machine['git']}; load average before {load_before}, after {ts.loadavg()}.", "",
             "| variant | first loss (rel diff) | median step (s) | tokens/s | speedup | best step (s) | "
             "best speedup | "
             "model TFLOP/s | other procs |", "|---" * 9 + "|"]
    for v in args.variants:
        med, best = statistics.median(times[v]), min(times[v])
        lines.append(f"| {v} | {first[v]:.6f} ({abs(first[v] - ref) / ref:.1e}) | {med:.2f} | {tokens / med:,.0f} | "
                     f"{base_med / med:.2f}x | {best:.2f} | {base_best / best:.2f}x | "
                     f"{tokens * flops['train'] / med / 1e12:.3f} | {statistics.median(others[v]):.0%} |")
    lines += ["", "Step times (s): " + "; ".join(f"{v} " + " ".join(f"{t:.2f}" for t in times[v])
                                                 for v in args.variants) + ".",
              "", f"Notes: {args.warmup} warmup + {args.steps} timed steps per variant, alternating (rotating "
              f"order) on one model; variants sharing an optimizer kind share its state. Waited {quiet.waited:.0f} s "
              f"for quiet CPUs. Wall time {time.perf_counter() - t_start:.0f} s. Variants are defined in "
              f"benchmarks/nanoseek_variants.py.", ""]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(text + "\n")
        print(f"appended to {out}")


if __name__ == "__main__":
    main()
