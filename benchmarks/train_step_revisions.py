"""A compiled training step of nanoseek at another git revision against the working tree, alternating in one process.

A benchmark, not a test. Consecutive runs on a shared machine differ by 10-30% from minute to minute (memory
bandwidth and page faults vary), which hides a change of a few percent; alternating steps of both versions in one
process on the same batches does not. The other revision's ``nanoseek`` package is exported with ``git archive``
into a temporary directory and imported as ``nanoseek_base`` (its custom ops renamed to that namespace), so both
versions live side by side.

One step = ``forward_train`` and the V3 objective (``training_loss``) as one torch.compile'd function (as
``nanoseek train --compile``), backward, and AdamW: ``--dtype bf16`` under bf16 autocast with torch's fused AdamW;
``--dtype bf16-weights`` bf16 weights with fp32 masters stepped by nanoseek's fused pass; ``fp32``. Same initial
weights (same seed) on both sides; the first rounds compile and are left out; the order of the two alternates.

Usage (from the repository root, with the venv active)::

    python benchmarks/train_step_revisions.py --base HEAD~3                            # bench preset, bf16 weights
    python benchmarks/train_step_revisions.py --base HEAD~3 --preset demo --batch 16 --seq 256 --mtp 1 --dtype bf16

Results are printed and appended, as a dated section, to benchmarks/results/train_step.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import io
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "train_step.md"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare the working tree with")
    p.add_argument("--preset", default="bench")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--mtp", type=int, default=0, help="MTP depth (default 0)")
    p.add_argument("--dtype", choices=("bf16", "bf16-weights", "fp32"), default="bf16-weights")
    p.add_argument("--rounds", type=int, default=16, help="timed rounds (each runs both versions once)")
    p.add_argument("--warmup", type=int, default=2, help="rounds left out (they compile)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def export_base(rev: str, directory: Path) -> str:
    """``nanoseek`` at ``rev`` as the package ``nanoseek_base`` under ``directory``; returns its commit."""
    commit = subprocess.check_output(["git", "rev-parse", "--short", rev], cwd=REPO, text=True).strip()
    archive = subprocess.check_output(["git", "archive", commit, "nanoseek"], cwd=REPO)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    package = directory / "nanoseek_base"
    (directory / "nanoseek").rename(package)
    for path in package.rglob("*.py"):  # custom ops: one namespace per version
        text = path.read_text()
        if "nanoseek::" in text:
            path.write_text(text.replace("nanoseek::", "nanoseek_base::"))
    return commit


def build(package: str, args) -> tuple:
    """The model of ``args.preset`` (seed 0) and a step function for it."""
    config = importlib.import_module(package + ".config")
    transformer = importlib.import_module(package + ".model.transformer")
    objectives = importlib.import_module(package + ".objectives")
    precision = importlib.import_module(package + ".train.precision")
    cfg = config.ModelConfig.preset(args.preset)
    cfg.num_nextn_predict_layers = args.mtp
    torch.manual_seed(0)
    model = transformer.DeepSeekV3(cfg)
    model.train()
    masters = precision.MasterWeights(model, fused=True) if args.dtype == "bf16-weights" else None
    params = [p for _, p in masters.named_parameters()] if masters else list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=masters is None)

    def forward_and_loss(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=args.dtype == "bf16"):
            out = model.forward_train(ids[:, :-1])
        return objectives.training_loss(out, ids[:, 1:], mtp_lambda=0.3, balance_alpha=1e-4).total

    compiled = torch.compile(forward_and_loss)

    def step(ids: torch.Tensor) -> float:
        loss = compiled(ids)
        loss.backward()
        if masters is not None:
            masters.step(opt)
            masters.zero_grad()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, cfg


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from nanoseek.allocator import keep_freed_memory

    keep_freed_memory()  # as nanoseek train does
    tmp = tempfile.TemporaryDirectory()
    base_commit = export_base(args.base, Path(tmp.name))
    sys.path.insert(0, tmp.name)
    head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "nanoseek"], cwd=REPO).returncode != 0
    names = {"base": f"{base_commit}", "tree": f"{head}{'-dirty' if dirty else ''}"}
    steps = {"base": build("nanoseek_base", args)[0]}
    steps["tree"], cfg = build("nanoseek", args)
    generator = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {k: [] for k in steps}
    losses: dict[str, list[float]] = {k: [] for k in steps}
    t_start = time.perf_counter()
    for r in range(args.warmup + args.rounds):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=generator)
        for key in (("base", "tree") if r % 2 == 0 else ("tree", "base")):
            t = time.perf_counter()
            losses[key].append(steps[key](ids))
            elapsed = time.perf_counter() - t
            if r >= args.warmup:
                times[key].append(elapsed)
            print(f"round {r} {key:4s} {names[key]}: {elapsed:.3f} s, loss {losses[key][-1]:.5f}", flush=True)
    tokens = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(b / t for b, t in zip(times["base"], times["tree"]))
    lines = [
        f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: revisions, {args.preset}, {args.batch} x "
        f"{args.seq} tokens, MTP depth {args.mtp}, {args.dtype}, compiled",
        "",
        f"Command: `python benchmarks/train_step_revisions.py {shlex.join(sys.argv[1:])}`",
        "",
        f"Machine: {_cpu_name()} ({platform.machine()}); {os.cpu_count()} cores; torch "
        f"{torch.__version__}; {args.threads} threads.",
        "",
        "| version | median step (s) | tokens/s | best step (s) | speedup (medians) |",
        "|---|---|---|---|---|",
    ]
    for key in ("base", "tree"):
        lines.append(f"| {key} {names[key]} | {med[key]:.3f} | {tokens / med[key]:,.0f} | {min(times[key]):.3f} | "
                     f"{med['base'] / med[key]:.2f}x |")
    lines += [
        "",
        f"Working tree against {names['base']}: {med['base'] / med['tree']:.3f}x on median steps, {paired:.3f}x as "
        f"the median of the {args.rounds} per-round ratios. Step times (s): base "
        + " ".join(f"{t:.2f}" for t in times["base"]) + "; tree " + " ".join(f"{t:.2f}" for t in times["tree"])
        + f". First losses: base {losses['base'][0]:.6f}, tree {losses['tree'][0]:.6f}. "
        f"{args.warmup} compiling rounds left out; wall time {time.perf_counter() - t_start:.0f} s. {args.note}",
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write("\n" + text)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
