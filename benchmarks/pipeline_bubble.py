"""Pipeline bubble of 1F1B vs DualPipeV on PP CPU processes, against SPEC §8's formulas.

    python benchmarks/pipeline_bubble.py                       # PP=4, writes benchmarks/results/pipeline_bubble.md
    python benchmarks/pipeline_bubble.py --pp 2 --steps 3 --out /tmp/pp2.md

Every compute action of the schedules (F forward, B full backward, I input backward, W weight backward, L the
loss) is timed on each rank, in wall-clock and in thread CPU time. Three numbers per schedule:

- measured: per rank, the idle fraction 1 - (time inside F/B/I/W/L) / (step time), wall clock. On a machine
  with fewer cores than ranks this also counts time a rank waited for a core, not only for its pipeline peers.
- simulated: the same per-rank action order, replayed with each action's measured CPU cost and zero
  communication time: the schedule's own bubble, free of core sharing.
- formula (SPEC §8): 1F1B (PP-1)(F+B); DualPipe (PP/2-1)(F&B+B-3W) with PP counting DualPipeV's 2 x ranks
  stages, i.e. (ranks-1)(F&B+B-3W) in V-chunks of half the layers; F&B = F + B on a CPU (no overlap of the
  two chunks' compute). F, B, W are the measured per-chunk CPU costs, averaged over the stages.

Recorded, not asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import DeepSeekV3, ModelConfig  # noqa: E402
from nanoseek.atomic import atomic_write_text  # noqa: E402
from nanoseek.distributed.spawn import run_spawned  # noqa: E402

SCHEDULES = ("1f1b", "dualpipev")


def model_config(args) -> ModelConfig:
    """A small all-MoE model (uniform chunks); MTP off by default so that stages are comparable."""
    return ModelConfig.preset("tiny").replace(
        vocab_size=1024, hidden_size=args.hidden, num_hidden_layers=args.layers, first_k_dense_replace=0,
        num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, moe_intermediate_size=128, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, rope_scaling_type=None, rope_factor=1.0, max_position_embeddings=4096,
        original_max_position_embeddings=4096, num_nextn_predict_layers=args.mtp)


# ---------------------------------------------------------------------------------------------- ranks
def _instrument(log: list) -> None:
    """Time every compute action of the pipeline stages: (kind, stage, mb, wall start, wall end, cpu s)."""
    from torch.distributed.pipelining import PipelineStage

    from nanoseek.distributed.pipeline import PipelineRunner

    def timed(fn, kind_of):
        def wrapper(self, *args, **kwargs):
            w0, c0 = time.perf_counter(), time.thread_time()
            out = fn(self, *args, **kwargs)
            kind, stage, mb = kind_of(self, *args, **kwargs)
            log.append((kind, stage, mb, w0, time.perf_counter(), time.thread_time() - c0))
            return out
        return wrapper

    PipelineStage.forward_one_chunk = timed(PipelineStage.forward_one_chunk,
                                            lambda s, mb, *a, **k: ("F", s.stage_index, mb))
    PipelineStage.backward_one_chunk = timed(
        PipelineStage.backward_one_chunk,
        lambda s, mb, *a, full_backward=True, **k: ("B" if full_backward else "I", s.stage_index, mb))
    PipelineStage.backward_weight_one_chunk = timed(PipelineStage.backward_weight_one_chunk,
                                                    lambda s, mb, *a, **k: ("W", s.stage_index, mb))
    PipelineRunner._loss_fn = timed(PipelineRunner._loss_fn, lambda r, *a, **k: ("L", r.layout.n_stages - 1, -1))


def _rank(rank: int, world_size: int, schedule: str, args) -> dict:
    import torch.distributed as dist

    from nanoseek.distributed.pipeline import PipelineRunner

    log: list = []
    _instrument(log)
    torch.manual_seed(0)
    model = DeepSeekV3(model_config(args))
    runner = PipelineRunner(model, dist.group.WORLD, schedule=schedule, n_microbatches=args.microbatches)
    g = torch.Generator().manual_seed(0)
    B = args.microbatches * args.mb_size
    steps = []
    for i in range(args.warmup + args.steps):
        batch = torch.randint(0, model.config.vocab_size, (B, args.seq_len + 1), generator=g)
        dist.barrier()
        log.clear()
        t0 = time.perf_counter()
        runner.step(batch, 0.3, 1e-4)
        t1 = time.perf_counter()
        for p in runner.parameters():
            p.grad = None
        if i >= args.warmup:
            steps.append(dict(wall=t1 - t0, actions=list(log)))
    return dict(steps=steps, n_stages=runner.layout.n_stages, stage_rank=runner.layout.stage_rank)


# ---------------------------------------------------------------------------------------------- analysis
def simulate(orders: list[list[tuple[str, int, int]]], cost: dict[tuple[int, str], float], n_stages: int):
    """Replay each rank's action order with the given costs and zero communication time.

    F(s, m) needs F(s-1, m); B/I(s, m) needs F(s, m) and B/I(s+1, m); W(s, m) needs I(s, m); the loss is
    part of the last stage's F. Returns (makespan, busy time per rank).
    """
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * len(orders)
    busy = [0.0] * len(orders)
    pos = [0] * len(orders)

    def ready_at(kind: str, s: int, m: int) -> float | None:
        deps = []
        if kind == "F" and s > 0:
            deps.append([("F", s - 1, m)])
        if kind in ("B", "I"):
            deps.append([("F", s, m)])
            if s < n_stages - 1:
                deps.append([("B", s + 1, m), ("I", s + 1, m)])  # either of them
        if kind == "W":
            deps.append([("I", s, m)])
        t = 0.0
        for alternatives in deps:
            times = [done[d] for d in alternatives if d in done]
            if not times:
                return None
            t = max(t, min(times))
        return t

    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r, order in enumerate(orders):
            while pos[r] < len(order):
                kind, s, m = order[pos[r]]
                t = ready_at(kind, s, m)
                if t is None:
                    break
                start = max(free[r], t)
                free[r] = start + cost[(s, kind)]
                busy[r] += cost[(s, kind)]
                done[(kind, s, m)] = free[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule replay is stuck (a dependency is never met)")
    return max(free), busy


def analyse(schedule: str, ranks: list[dict]) -> dict:
    n_stages = ranks[0]["n_stages"]
    P = len(ranks)
    n_steps = len(ranks[0]["steps"])
    # per-chunk CPU cost per (stage, kind); the loss is folded into the last stage's F
    samples: dict[tuple[int, str], list[float]] = defaultdict(list)
    loss = []
    for r in ranks:
        for st in r["steps"]:
            for kind, s, mb, w0, w1, cpu in st["actions"]:
                (loss if kind == "L" else samples[(s, kind)]).append(cpu)
    cost = {k: statistics.median(v) for k, v in samples.items()}
    loss_cost = statistics.median(loss) if loss else 0.0
    cost[(n_stages - 1, "F")] += loss_cost
    # measured idle fraction per rank (wall clock), median over steps
    measured, walls = [], []
    for r in ranks:
        fr = []
        for st in r["steps"]:
            inside = sum(w1 - w0 for _, _, _, w0, w1, _ in st["actions"])
            fr.append(1 - inside / st["wall"])
        measured.append(statistics.median(fr))
        walls.append(statistics.median(st["wall"] for st in r["steps"]))
    # simulated bubble: each rank's executed order (first measured step), measured CPU costs
    orders = [[(k, s, m) for k, s, m, *_ in r["steps"][0]["actions"] if k != "L"] for r in ranks]
    makespan, busy = simulate(orders, cost, n_stages)
    sim_idle = [makespan - b for b in busy]

    def mean_kind(kind: str, skip_first: bool = False) -> float:
        vals = [v for (s, k), v in cost.items() if k == kind and not (skip_first and s == 0)]
        return statistics.mean(vals) if vals else 0.0

    F, B = mean_kind("F"), mean_kind("B")
    W = mean_kind("W", skip_first=True)  # stage 0's W is its whole backward (it has no input gradient)
    if schedule == "1f1b":
        formula, formula_text = (P - 1) * (F + B), f"(PP-1)(F+B) = {P - 1} x ({F * 1e3:.1f} + {B * 1e3:.1f}) ms"
    else:
        formula = (P - 1) * ((F + B) + B - 3 * W)
        formula_text = (f"({n_stages}/2-1)(F&B+B-3W) = {P - 1} x ({F * 1e3:.1f}+{B * 1e3:.1f} + "
                        f"{B * 1e3:.1f} - 3 x {W * 1e3:.1f}) ms")
    # what splitting B into I + W costs (middle stages: the first has no I, the last includes the loss)
    middle = [s for s in range(1, n_stages - 1) if (s, "I") in cost and (s, "W") in cost]
    split_cost = (statistics.mean((cost[(s, "I")] + cost[(s, "W")]) / cost[(s, "B")] for s in middle)
                  if middle else None)
    return dict(schedule=schedule, P=P, n_stages=n_stages, n_steps=n_steps, cost=cost, loss=loss_cost, F=F, B=B,
                W=W, split_cost=split_cost, measured=measured, step_wall=statistics.median(walls),
                makespan=makespan, busy=busy, sim_idle=sim_idle, formula=formula, formula_text=formula_text)


# ---------------------------------------------------------------------------------------------- report
def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def wait_quiet(budget_s: float) -> float:
    """Wait (at most ``budget_s``) until other processes leave the cores mostly idle; return the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < budget_s and os.getloadavg()[0] > 0.5:
        time.sleep(5)
    return time.perf_counter() - t0


def report(results: list[dict], args, cfg: ModelConfig, elapsed: float, start_machine: str, loads: str) -> str:
    P = results[0]["P"]
    tokens = args.mb_size * args.seq_len
    lines = [
        "# Pipeline bubble: 1F1B vs DualPipeV (CPU processes)", "",
        f"Command: `{' '.join(['python benchmarks/pipeline_bubble.py', *sys.argv[1:]])}`",
        "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {start_machine}. {P} gloo processes, "
        f"1 thread each, `OMP_WAIT_POLICY=PASSIVE`; the whole run took {elapsed:.0f} s; {loads}.", "",
        f"Model: {cfg.num_hidden_layers} MoE layers (hidden {cfg.hidden_size}, {cfg.n_routed_experts} experts top-"
        f"{cfg.num_experts_per_tok} + 1 shared), vocab {cfg.vocab_size}, MTP depth {cfg.num_nextn_predict_layers}, "
        f"fp32. {args.microbatches} micro-batches of {args.mb_size} x {args.seq_len} tokens ({tokens} tokens) per "
        f"step; {args.warmup} warm-up + {args.steps} measured steps per schedule (medians).", "",
        "Per-chunk CPU cost (thread CPU time, median over micro-batches and steps; the last stage's F includes the "
        "loss). 1F1B chunks are L/PP layers, DualPipeV chunks L/(2 PP) layers:", "",
        "| schedule | stage | layers | F ms | B ms | I ms | W ms |", "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for s in range(res["n_stages"]):
            c = res["cost"]
            cell = lambda k: f"{c[(s, k)] * 1e3:.1f}" if (s, k) in c else "-"  # noqa: E731
            lines.append(f"| {res['schedule']} | {s} | {cfg.num_hidden_layers // res['n_stages']} | {cell('F')} | "
                         f"{cell('B')} | {cell('I')} | {cell('W')} |")
    lines += ["", "Bubble per rank (idle time of a step; rank order 0..PP-1):", "",
              "| schedule | measured idle fraction (wall) | step wall s | simulated makespan s | simulated idle s "
              "per rank | simulated idle fraction | formula (SPEC §8) | formula s |",
              "|---|---|---|---|---|---|---|---|"]
    for res in results:
        ms = res["makespan"]
        lines.append(
            f"| {res['schedule']} | {' / '.join(f'{x:.2f}' for x in res['measured'])} | {res['step_wall']:.2f} | "
            f"{ms:.2f} | {' / '.join(f'{x:.2f}' for x in res['sim_idle'])} | "
            f"{' / '.join(f'{x / ms:.2f}' for x in res['sim_idle'])} | {res['formula_text']} | "
            f"{res['formula']:.2f} |")
    one, dual = results[0], results[1]
    lines += [
        "", "Reading:", "",
        f"- Simulated (the schedules' own bubble with these chunk costs): mean idle "
        f"{statistics.mean(one['sim_idle']):.2f} s for 1F1B vs {statistics.mean(dual['sim_idle']):.2f} s for "
        f"DualPipeV; the formulas give "
        f"{one['formula']:.2f} s and {dual['formula']:.2f} s.",
        "- The formula counts the bubble of a rank of uniform stages; per-rank simulated idle differs by rank "
        "because the first and last stages cost differently (embedding; head and loss) and DualPipeV's ranks "
        "do not all wait the same.",
        f"- Measured idle fractions include waiting for a core whenever more ranks than cores ({os.cpu_count()}) "
        "are busy, and gloo/Python overhead per action; the simulated column removes both.",
        f"- With more ranks than cores the wall clock cannot show the bubble: the step times ({one['step_wall']:.2f} "
        f"s and {dual['step_wall']:.2f} s against simulated makespans of {one['makespan']:.2f} s and "
        f"{dual['makespan']:.2f} s) are set by the total CPU work of the ranks (and of other jobs) sharing the "
        "cores, since an idle rank's core runs another rank.",
        "- F&B is F + B here: on a CPU the paired forward and backward run one after the other; the "
        "OVERLAP_F_B function only starts the forward's send before the backward.",
    ]
    if dual["split_cost"]:
        lines.append(f"- Zero-bubble's split of B into I + W is not free: I + W = {dual['split_cost']:.2f} x B on the "
                     "middle stages (two autograd passes instead of one).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--mtp", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--mb-size", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="wait up to this many seconds for the 1-minute load average to drop below 0.5")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pipeline_bubble.md"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start_machine = machine()
    waited = wait_quiet(args.wait_quiet)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    results = []
    for schedule in SCHEDULES:
        ranks = run_spawned(_rank, args.pp, schedule, args, timeout_s=600)
        results.append(analyse(schedule, ranks))
        r = results[-1]
        print(f"{schedule}: step {r['step_wall']:.2f} s, measured idle {[round(x, 2) for x in r['measured']]}, "
              f"simulated idle {[round(x, 2) for x in r['sim_idle']]} s of {r['makespan']:.2f}, "
              f"formula {r['formula']:.2f} s", flush=True)
    load1 = os.getloadavg()
    loads = (f"load average (1/5/15 min) {' '.join(f'{x:.2f}' for x in load0)} before, "
             f"{' '.join(f'{x:.2f}' for x in load1)} after (waited {waited:.0f} s for a quiet machine)")
    text = report(results, args, model_config(args), time.perf_counter() - t0, start_machine, loads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
