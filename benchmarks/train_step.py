"""One training step, side by side: nanoseek vs transformers' DeepseekV3ForCausalLM, same model and weights.

A benchmark, not a test. One step = forward, next-token cross-entropy (each library's own, see Impl.loss),
backward, AdamW step, zero_grad.

  * Same weights: a nanoseek model (``num_nextn_predict_layers=0``, so both sides hold the same parameters)
    is saved with ``nanoseek.hf.save_pretrained`` and read back by both ``nanoseek.hf.load_pretrained`` and
    ``transformers.AutoModelForCausalLM.from_pretrained`` in the same dtype. The first-step losses (same batch,
    before any update) are printed with their relative difference; later steps keep tracking each other since
    both sides see the same batches.
  * transformers runs its default implementation (in 5.24: experts ``grouped_mm``, attention ``sdpa``); the
    implementation it actually used is read back from ``model.config._experts_implementation`` /
    ``_attn_implementation``. ``--impls nanoseek,hf,hf-eager`` adds transformers with the per-expert loop;
    ``nanoseek-explicit-attn`` is nanoseek without its fused CPU attention kernel (nanoseek.model.cpu_attention);
    ``nanoseek-torch-grouped-mm`` is nanoseek without its grouped expert kernel (nanoseek.model.cpu_grouped_mm);
    ``nanoseek-fp32-moments`` is nanoseek with fp32 AdamW moments whatever ``--optimizer-states`` says.
  * Precision (``--dtype``): ``fp32``; ``bf16`` with ``--bf16-mode autocast`` (default: fp32 master weights and
    AdamW state, forward under ``torch.autocast(bfloat16)`` on both sides, the realistic training setup) or
    ``--bf16-mode weights`` (bf16 parameters, gradients and AdamW state on both sides; routers stay fp32, as
    both loaders keep them).
  * The implementations alternate step by step in one process (the first one of each step rotates, so neither
    always runs on a warmer or colder cache); warmup steps are discarded; the median step time gives tokens/s.
  * Model FLOPs per token are counted matmul by matmul (attention projections, causal attention scores,
    dense FFN, router, the k active routed experts, shared experts, output head; training = 3 x forward) and
    MFU is taken against a matmul peak measured here with a large ``torch.matmul`` in the compute dtype.
  * Peak memory: on CPU, each implementation runs again in a fresh child process (load, AdamW, two steps) and
    reports its peak RSS (VmHWM; ``getrusage`` ru_maxrss is not usable there, a fork + exec child inherits the
    parent's), plus the RSS right before its first step (weights loaded); on CUDA,
    ``torch.cuda.max_memory_allocated`` per step in the main process.
  * ``--profile`` profiles one nanoseek step (``--profile-impls`` for others) with torch.profiler and prints
    the top aten ops and a per-module breakdown (forward and backward; backward ops are attributed to the
    module whose forward op created their autograd node, through the autograd sequence number). With
    ``--compile`` it times the step graph by graph instead: each compiled graph, its matrix products and
    Inductor's own kernels (``profile_compiled_step``).

Results are printed and appended, as a dated section, to benchmarks/results/train_step.md.

Usage (from the repository root, with the venv active)::

    python benchmarks/train_step.py                          # bench preset, 4 x 512 tokens, fp32
    python benchmarks/train_step.py --dtype bf16             # bf16 autocast, fp32 master weights
    python benchmarks/train_step.py --dtype bf16 --bf16-mode weights
    python benchmarks/train_step.py --impls nanoseek,hf,hf-eager --steps 3
    python benchmarks/train_step.py --profile --steps 0      # profile a nanoseek step only (no comparison)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "train_step.md"
IMPLS = ("nanoseek", "nanoseek-explicit-attn", "nanoseek-torch-grouped-mm", "nanoseek-fp32-moments", "hf",
         "hf-eager")


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench", help="nanoseek ModelConfig preset (default: bench)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--bf16-mode", choices=("autocast", "weights", "master"), default="autocast",
                   help="with --dtype bf16: autocast (fp32 master weights, default), bf16 weights, or master: "
                        "each side's own mixed precision, nanoseek --dtype bf16-weights (bf16 weights, fp32 master "
                        "copies) against transformers under autocast (fp32 weights)")
    p.add_argument("--optimizer-states", choices=("fp32", "bf16"), default="fp32",
                   help="with --bf16-mode master: nanoseek's AdamW moments (as `nanoseek train --optimizer-states`; "
                        "bf16 is DeepSeek-V3's); nanoseek-fp32-moments keeps them in fp32")
    p.add_argument("--steps", type=int, default=4, help="timed steps per implementation (after warmup)")
    p.add_argument("--warmup", type=int, default=1, help="discarded steps per implementation")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (CPU)")
    p.add_argument("--impls", default="nanoseek,hf",
                   help=f"comma list from {','.join(IMPLS)} (hf = transformers default experts implementation)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile nanoseek's forward and loss as one function, and with --bf16-mode master step the "
                        "masters in one compiled pass (as `nanoseek train --compile`); the warmup steps compile")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--adamw", choices=("default", "foreach", "fused"), default="default",
                   help="AdamW implementation, the same on every side (default: torch's choice, the for-loop one "
                        "on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mem", choices=("child", "off"), default="child",
                   help="CPU peak memory per implementation in a fresh child process (default) or not at all")
    p.add_argument("--wait-quiet", type=float, default=90.0,
                   help="total seconds the run may spend waiting, before steps, for other processes to leave the "
                        "CPUs idle (shared machines; 0: never wait)")
    p.add_argument("--max-other", type=float, default=0.2,
                   help="timed steps during which other processes used more than this share of the CPUs are left "
                        "out of the median and best (kept if no step is left)")
    p.add_argument("--extra-steps", type=int, default=4,
                   help="up to this many more timed rounds while some implementation has fewer than --steps "
                        "undisturbed steps (see --max-other)")
    p.add_argument("--peak-size", type=int, default=0, help="matmul size for the peak measurement (0: auto)")
    p.add_argument("--profile", action="store_true", help="also profile one step with torch.profiler")
    p.add_argument("--profile-impls", default="nanoseek", help="implementations to profile (comma list)")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to append results to")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to --out")
    p.add_argument("--note", default="", help="free text recorded with the results")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: the process keeps freed memory for reuse, as `nanoseek train` does on the CPU "
                        "(nanoseek/allocator.py; it applies to every implementation in the process); "
                        "default: glibc's defaults (large blocks mapped and unmapped, page faults every step)")
    # internal: memory child
    p.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_ckpt", dest="ckpt", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    args.profile_impls = [s.strip() for s in args.profile_impls.split(",") if s.strip()]
    for name in args.impls + args.profile_impls:
        if name not in IMPLS:
            p.error(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")
    if args.steps < 0 or args.warmup < 0:
        p.error("--steps and --warmup must be >= 0")
    return args


def precision_label(args) -> str:
    if args.dtype == "fp32":
        return "fp32"
    if args.bf16_mode == "master":
        return "bf16, fp32 master weights: nanoseek bf16 weights + fp32 masters, transformers autocast"
    return "bf16 autocast (fp32 master weights)" if args.bf16_mode == "autocast" else "bf16 weights"


def weight_dtype(args) -> torch.dtype:
    return torch.bfloat16 if (args.dtype == "bf16" and args.bf16_mode == "weights") else torch.float32


def compute_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.dtype == "bf16" else torch.float32


def autocast_ctx(args, device: torch.device, name: str = ""):
    nanoseek = name.startswith("nanoseek")
    if args.dtype == "bf16" and (args.bf16_mode == "autocast" or (args.bf16_mode == "master" and not nanoseek)):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- machine
def machine_info(args, device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "cores": os.cpu_count()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = "not installed"
    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                if k in ("model name", "cpu family", "model", "flags") and k not in cpu:
                    cpu[k] = v
    except OSError:
        pass
    flags = set(cpu.get("flags", "").split())
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    info["cpu"] = (f"{cpu.get('model name', platform.processor() or 'unknown')} (family {cpu.get('cpu family', '?')}"
                   f" model {cpu.get('model', '?')}; {' '.join(simd) or 'no avx2'})")
    try:
        mem_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                          if l.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["git"] = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                     capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        info["git"] = "?"
    return info


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc/self/statm)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def maxrss_bytes() -> int:
    """Peak RSS of this process image: VmHWM (reset by exec, unlike ru_maxrss, which a child started with
    fork + exec inherits from its parent's size at the fork), else ``getrusage`` ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def cpu_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all processes; /proc/stat), 0.0 where unavailable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class QuietWaiter:
    """Before each measured step, wait (within a total budget) until other processes leave the CPUs idle.

    On a shared machine another job's burst can double a step's time; the alternation spreads that over both
    implementations, but waiting for a quiet moment removes most of it. Quiet = other processes used less than
    ``threshold`` of the machine's CPUs over a ``window``-second sample.
    """

    def __init__(self, budget_s: float, threshold: float = 0.10, window: float = 1.0):
        self.left, self.threshold, self.window = budget_s, threshold, window
        self.waited = 0.0

    def __call__(self) -> None:
        while self.left > 0:
            b0, c0, t0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
            time.sleep(self.window)
            dt_ = time.perf_counter() - t0
            others = (cpu_busy_seconds() - b0 - (time.process_time() - c0)) / (dt_ * (os.cpu_count() or 1))
            if others < self.threshold:
                return
            self.left -= dt_
            self.waited += dt_


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 0, reps: int = 8) -> float:
    """Best achieved FLOP/s of an n x n x n torch.matmul in ``dtype`` (the machine's practical peak)."""
    if not n:
        n = 8192 if device.type == "cuda" else 2048
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.matmul(a, b)  # warm up (oneDNN / cuBLAS heuristics)
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------- FLOPs
def flops_per_token(cfg, seq: int) -> dict:
    """Matmul FLOPs per token of one forward (2 per multiply-add) by part; ``train`` = 3 x forward.

    Attention scores count causal work: query t attends to t + 1 keys, (seq + 1) / 2 on average.
    Elementwise ops, norms, softmax and the optimizer are not counted (standard MFU convention).
    """
    d, h, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    qk, dv = cfg.qk_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank * h * qk
    else:
        q = d * h * qk
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + dv)
    proj = q + kv + h * dv * d
    n_moe = sum(1 for i in range(L) if cfg.is_moe_layer(i))
    n_dense = L - n_moe
    parts = {
        "attn_proj": 2 * proj * L,
        "attn_scores": 2 * h * (qk + dv) * (seq + 1) / 2 * L,
        "dense_ffn": 2 * 3 * d * cfg.intermediate_size * n_dense,
        "router": 2 * d * cfg.n_routed_experts * n_moe,
        "routed_experts": 2 * 3 * d * cfg.moe_intermediate_size * cfg.num_experts_per_tok * n_moe,
        "shared_experts": 2 * 3 * d * cfg.moe_intermediate_size * cfg.n_shared_experts * n_moe,
        "head": 2 * d * cfg.vocab_size,
    }
    fwd = sum(parts.values())
    active_matmul_params = (proj * L + 3 * d * cfg.intermediate_size * n_dense
                            + (d * cfg.n_routed_experts + 3 * d * cfg.moe_intermediate_size
                               * (cfg.num_experts_per_tok + cfg.n_shared_experts)) * n_moe + d * cfg.vocab_size)
    return {"parts": parts, "forward": fwd, "train": 3 * fwd, "six_n": 6 * active_matmul_params,
            "active_matmul_params": active_matmul_params}


# ---------------------------------------------------------------------------------------------- models
def build_checkpoint(cfg, seed: int, directory: Path) -> Path:
    from nanoseek import DeepSeekV3
    from nanoseek.hf import save_pretrained

    torch.manual_seed(seed)
    model = DeepSeekV3(cfg)
    path = directory / "ckpt"
    save_pretrained(model, path)  # fp32 on disk; each side casts on load
    del model
    return path


class Impl:
    """One implementation under test: a model, its AdamW, and how to get logits from it."""

    def __init__(self, name: str, model: torch.nn.Module, args, device: torch.device, info: str):
        self.name, self.model, self.info = name, model, info
        self.nanoseek = name.startswith("nanoseek")
        self.model.train()
        # as `nanoseek train --compile`: the forward and the loss as one compiled function
        self.compiled = torch.compile(self._logits_and_loss) if self.nanoseek and args.compile else None
        # Same optimizer, same settings, both sides (default torch implementation choice).
        impl_kw = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[args.adamw]
        self.masters = None
        params = [p for p in model.parameters() if p.requires_grad]
        if self.nanoseek and args.dtype == "bf16" and args.bf16_mode == "master":
            from nanoseek.train.precision import MasterWeights

            # bf16 weights; fp32 copies stepped by AdamW, with --compile in one compiled pass per weight (as train)
            bf16_moments = args.optimizer_states == "bf16" and name != "nanoseek-fp32-moments"
            self.masters = MasterWeights(model, fused=args.compile,
                                         states_dtype=torch.bfloat16 if bf16_moments else torch.float32)
            params = [p for _, p in self.masters.named_parameters()]
        self.opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, **impl_kw)
        self.args, self.device = args, device
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.others: list[float] = []  # share of the machine's CPUs used by other processes during each step
        # minor page faults and system CPU seconds of this process during each step (fresh memory costs ~12 us a page)
        self.faults: list[int] = []
        self.sys_times: list[float] = []
        self.losses: list[float] = []
        self.peak_mem: list[int] = []
        self.state = self.state_bytes()

    def routes(self):
        """nanoseek-explicit-attn: nanoseek without its fused CPU attention kernel; nanoseek-torch-grouped-mm: without
        its grouped expert kernel (traced without it, too)."""
        if self.name == "nanoseek-explicit-attn":
            from nanoseek.model import cpu_attention

            return cpu_attention.disabled()
        if self.name == "nanoseek-torch-grouped-mm":
            from nanoseek.model import cpu_grouped_mm

            return cpu_grouped_mm.disabled()
        return contextlib.nullcontext()

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self.nanoseek:
            return self.model(ids)
        return self.model(input_ids=ids, use_cache=False).logits

    def _logits_and_loss(self, ids: torch.Tensor) -> torch.Tensor:
        return self.loss(self.logits(ids), ids)

    def loss(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy, each library's own (the same math): nanoseek's as `nanoseek train` computes
        it; for transformers what its ForCausalLMLoss computes, cross-entropy on the fp32 copy of the logits."""
        if self.nanoseek:
            from nanoseek.objectives import next_token_loss

            return next_token_loss(logits[:, :-1], ids[:, 1:])
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())

    def step(self, ids: torch.Tensor, timed: bool = True) -> float:
        device = self.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0, c0, b0 = time.perf_counter(), time.process_time(), cpu_busy_seconds()
        u0 = resource.getrusage(resource.RUSAGE_SELF)
        with autocast_ctx(self.args, device, self.name), self.routes():
            loss = self.compiled(ids) if self.compiled is not None else self._logits_and_loss(ids)
            loss.backward()
        if self.masters is not None:
            self.masters.step(self.opt)  # AdamW on the masters, then the bf16 weights refreshed
        else:
            self.opt.step()
        if self.masters is not None:
            self.masters.zero_grad()
        else:
            self.opt.zero_grad(set_to_none=True)
        sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        others = max(0.0, cpu_busy_seconds() - b0 - cpu) / (wall * (os.cpu_count() or 1))
        u1 = resource.getrusage(resource.RUSAGE_SELF)
        value = loss.item()
        if timed:
            self.times.append(wall)
            self.cpu_times.append(cpu)
            self.others.append(others)
            self.faults.append(u1.ru_minflt - u0.ru_minflt)
            self.sys_times.append(u1.ru_stime - u0.ru_stime)
        self.losses.append(value)
        if device.type == "cuda":
            self.peak_mem.append(torch.cuda.max_memory_allocated(device))
        return value

    def clean(self, max_other: float) -> list[float]:
        """Timed steps not disturbed by other processes (all of them if none is clean)."""
        kept = [t for t, o in zip(self.times, self.others) if o <= max_other]
        return kept or list(self.times)

    def state_bytes(self) -> int:
        """Parameters + gradients + AdamW moments (what a step holds besides activations)."""
        n = 0
        if self.masters is not None:  # bf16 weight and gradient, fp32 master, two moments (fp32 or bf16)
            moments = 2 * torch.finfo(self.masters.states_dtype).bits // 8
            return sum(p.numel() * (2 * p.element_size() + 4 + moments)
                       for p in self.model.parameters() if p.requires_grad)
        for p in self.model.parameters():
            if p.requires_grad:
                n += 4 * p.numel() * p.element_size()  # param, grad, exp_avg, exp_avg_sq (same dtype)
        return n


def load_impl(name: str, ckpt: Path, args, device: torch.device) -> Impl:
    wd = weight_dtype(args)
    if name.startswith("nanoseek"):
        from nanoseek.hf import load_pretrained
        from nanoseek.model import cpu_attention, cpu_grouped_mm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_pretrained(ckpt, dtype=wd, device=device)
        fused = name != "nanoseek-explicit-attn" and args.dtype == "bf16" and cpu_attention.available()
        attention = "fused CPU attention kernel (bf16)" if fused else "F.sdpa / explicit bf16 scores"
        bf16_moments = (args.dtype == "bf16" and args.bf16_mode == "master" and args.optimizer_states == "bf16"
                        and name != "nanoseek-fp32-moments")
        own_grouped = name != "nanoseek-torch-grouped-mm" and args.dtype == "bf16" and cpu_grouped_mm.available()
        grouped = "nanoseek's bf16 CPU kernel" if own_grouped else "torch._grouped_mm when eligible"
        return Impl(name, model, args, device, f"grouped experts ({grouped}), {attention}"
                    + (", torch.compile" if args.compile else "") + (", bf16 AdamW moments" if bf16_moments else ""))
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kwargs = {"experts_implementation": "eager"} if name == "hf-eager" else {}
    model, loading = AutoModelForCausalLM.from_pretrained(ckpt, dtype=wd, output_loading_info=True, **kwargs)
    bad = {k: v for k, v in loading.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"transformers did not load the checkpoint cleanly: {bad}")
    model = model.to(device)
    # make sure every parameter owns writable memory (not a view of the safetensors mmap)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    cfg = model.config
    info = (f"experts={cfg._experts_implementation}, attn={cfg._attn_implementation}")
    return Impl(name, model, args, device, info)


def make_batches(cfg, args, n: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1)
    return [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- memory child
def mem_child(args) -> None:
    """Load one implementation, two steps, report RSS before the first step and the process's max RSS."""
    from nanoseek import ModelConfig

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_hf(args.ckpt)
    impl = load_impl(args.mem_child, Path(args.ckpt), args, device)
    batches = make_batches(cfg, args, 2, device)
    base = rss_bytes()
    for ids in batches:
        impl.step(ids)
    print(json.dumps({"impl": args.mem_child, "rss_before_step": base, "maxrss": maxrss_bytes(),
                      "state_bytes": impl.state_bytes()}))


def run_mem_children(args, ckpt: Path) -> dict:
    out = {}
    for name in args.impls:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem-child", name, "--_ckpt", str(ckpt),
               "--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype,
               "--bf16-mode", args.bf16_mode, "--threads", str(args.threads), "--lr", str(args.lr),
               "--seed", str(args.seed), "--device", args.device, "--adamw", args.adamw, "--malloc", args.malloc,
               "--optimizer-states", args.optimizer_states]
        print(f"[mem] {name}: fresh process, load + 2 steps ...", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if r.returncode or not lines:
            print(f"[mem] {name} failed (rc {r.returncode}): {r.stderr[-2000:]}", flush=True)
            continue
        out[name] = json.loads(lines[-1])
    return out


# ---------------------------------------------------------------------------------------------- profiler
def _module_labels(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    """Coarse categories for both implementations' modules (innermost labelled module wins)."""
    labels = {}
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        leaf = name.rsplit(".", 1)[-1]
        if cls in ("MultiHeadLatentAttention", "DeepseekV3Attention"):
            labels[mod] = "attention"
        elif cls in ("Router", "DeepseekV3TopkRouter"):
            labels[mod] = "moe.router"
        elif cls in ("RoutedExperts", "DeepseekV3Experts"):
            labels[mod] = "moe.routed_experts"
        elif leaf == "shared_experts":
            labels[mod] = "moe.shared_experts"
        elif cls in ("MoE", "DeepseekV3MoE"):
            labels[mod] = "moe.other"
        elif cls in ("MLP", "DeepseekV3MLP"):
            labels[mod] = "dense_ffn"
        elif cls in ("RMSNorm", "DeepseekV3RMSNorm") and leaf in (
                "input_layernorm", "post_attention_layernorm", "norm"):
            labels[mod] = "norms"
        elif cls == "Embedding":
            labels[mod] = "embedding"
        elif leaf == "lm_head":
            labels[mod] = "lm_head"
        elif cls in ("RotaryEmbedding", "DeepseekV3RotaryEmbedding"):
            labels[mod] = "rope_tables"
    return labels


def profile_compiled_step(impl: Impl, ids: torch.Tensor) -> str:
    """One step of a torch.compile'd implementation, timed graph by graph: torch.profiler's module hooks would
    recompile the graphs, and under the profiler the products inside ``_grouped_mm`` looked ~5x slower than
    they run. Each call of a compiled graph and each of its extern kernels (mm, bmm, _grouped_mm, ...) is timed
    by wrapping them; what a graph spends outside its extern kernels is Inductor's own (fused) kernels."""
    from torch._inductor.output_code import CompiledFxGraph
    from torch._inductor.select_algorithm import extern_kernels

    phase = ["forward"]
    order: dict[int, str] = {}  # id(graph) -> "forward 3", ... in order of first call
    graphs: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # name -> [calls, seconds]
    extern: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])  # (graph, kernel) -> [calls, s]
    current = [None]
    originals = {n: getattr(extern_kernels, n) for n in ("mm", "bmm", "addmm", "baddbmm", "_grouped_mm")
                 if hasattr(extern_kernels, n)}

    def timed_kernel(name, fn):
        def run(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            extern[(current[0], name)][0] += 1
            extern[(current[0], name)][1] += time.perf_counter() - t
            return out
        return run

    graph_call = CompiledFxGraph.__call__

    def timed_graph(self, inputs):
        if id(self) not in order:
            order[id(self)] = f"{phase[0]} {sum(v.startswith(phase[0]) for v in order.values()) + 1}"
        name = order[id(self)]
        outer, current[0] = current[0], name
        t = time.perf_counter()
        try:
            return graph_call(self, inputs)
        finally:
            graphs[name][0] += 1
            graphs[name][1] += time.perf_counter() - t
            current[0] = outer

    impl.step(ids, timed=False)  # compiled already by the warmup; once more to settle
    for n, fn in originals.items():
        setattr(extern_kernels, n, timed_kernel(n, fn))
    CompiledFxGraph.__call__ = timed_graph
    try:
        t0 = time.perf_counter()
        with autocast_ctx(impl.args, impl.device, impl.name):
            loss = impl.compiled(ids)
        t1 = time.perf_counter()
        phase[0] = "backward"
        loss.backward()
        t2 = time.perf_counter()
        phase[0] = "optimizer"
        if impl.masters is not None:
            impl.masters.step(impl.opt)
        else:
            impl.opt.step()
        if impl.masters is not None:
            impl.masters.zero_grad()
        else:
            impl.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
    finally:
        for n, fn in originals.items():
            setattr(extern_kernels, n, fn)
        CompiledFxGraph.__call__ = graph_call
    in_graphs = sum(v[1] for v in graphs.values())
    in_extern = sum(v[1] for v in extern.values())
    lines = [f"compiled step of {impl.name}: {t3 - t0:.3f} s (forward + loss {t1 - t0:.3f}, backward {t2 - t1:.3f}, "
             f"optimizer {t3 - t2:.3f}); in compiled graphs {in_graphs:.3f} s, of which extern kernels (matrix "
             f"products) {in_extern:.3f} s and Inductor's kernels {in_graphs - in_extern:.3f} s; outside the graphs "
             f"{t3 - t0 - in_graphs:.3f} s",
             "", f"  {'graph':14s} {'calls':>5s} {'total ms':>9s} {'extern ms':>10s} {'inductor ms':>12s}  extern kernels"]
    for name, (calls, sec) in sorted(graphs.items(), key=lambda kv: -kv[1][1]):
        kernels = {k: v for (g, k), v in extern.items() if g == name}
        ext = sum(v[1] for v in kernels.values())
        detail = ", ".join(f"{k} {v[0]} x {1e3 * v[1] / v[0]:.2f} ms" for k, v in sorted(kernels.items()))
        lines.append(f"  {name:14s} {calls:5d} {1e3 * sec:9.1f} {1e3 * ext:10.1f} {1e3 * (sec - ext):12.1f}  {detail}")
    return "\n".join(lines)


def profile_step(impl: Impl, ids: torch.Tensor, rows: int) -> str:
    """Profile one step; return a text report: top ops and a per-module forward/backward breakdown."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    labels = _module_labels(impl.model)
    handles = []
    tag = "@mod:"

    def pre(mod, _inp):
        rf = record_function(tag + labels[mod])
        rf.__enter__()
        mod._bench_rf = rf

    def post(mod, _inp, _out):
        rf = getattr(mod, "_bench_rf", None)
        if rf is not None:
            rf.__exit__(None, None, None)
            mod._bench_rf = None

    for mod in labels:
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    device = impl.device
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        sync(device)
        t0, c0, b0 = time.perf_counter(), time.process_time(), cpu_busy_seconds()
        with profile(activities=acts, record_shapes=True) as prof:
            with autocast_ctx(impl.args, device, impl.name):
                with record_function(tag + "forward(other)"):
                    logits = impl.logits(ids)
                with record_function(tag + "loss"):
                    loss = impl.loss(logits, ids)
            loss.backward()
            with record_function(tag + "optimizer"):
                if impl.masters is not None:  # as Impl.step: the masters, then the bf16 weights refreshed
                    impl.masters.step(impl.opt)
                    impl.masters.zero_grad()
                else:
                    impl.opt.step()
                    impl.opt.zero_grad(set_to_none=True)
            sync(device)
        wall = time.perf_counter() - t0
        others = max(0.0, cpu_busy_seconds() - b0 - (time.process_time() - c0)) / (wall * (os.cpu_count() or 1))
    finally:
        for h in handles:
            h.remove()

    events = prof.events()
    # forward: innermost module label; backward: label of the forward op with the same sequence number
    def fwd_label(e):
        p = e
        while p is not None:
            if p.name.startswith(tag):
                return p.name[len(tag):]
            p = p.cpu_parent
        return "forward(other)"

    def bwd_root(e):
        p = e
        while p is not None:
            if p.name.startswith("autograd::engine::evaluate_function:"):
                return p
            p = p.cpu_parent
        return None

    seq_label: dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and e.name.startswith("aten::") and bwd_root(e) is None:
            seq_label.setdefault(e.sequence_nr, fwd_label(e))
    by_part: dict[tuple[str, str], float] = defaultdict(float)
    by_part_op: dict[tuple[str, str, str], float] = defaultdict(float)
    for e in events:
        if e.name.startswith(tag) or e.name.startswith("autograd::engine::evaluate_function:") \
                or e.name.startswith("ProfilerStep") or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        root = bwd_root(e)
        if root is not None:
            node = root.name.split(":", 2)[-1].strip()
            if "AccumulateGrad" in node:
                label, phase = "accumulate_grad", "bwd"
            else:
                label, phase = seq_label.get(root.sequence_nr, "other"), "bwd"
        else:
            label = fwd_label(e)
            phase = "step" if label == "optimizer" else "fwd"
        by_part[(label, phase)] += e.self_cpu_time_total
        by_part_op[(label, phase, e.name)] += e.self_cpu_time_total
    total = sum(by_part.values()) or 1.0

    lines = [f"profile: {impl.name} ({impl.info}); {precision_label(impl.args)}; one step, wall {wall:.2f} s "
             f"under the profiler (self CPU time attributed: {total / 1e6:.2f} s; other processes used "
             f"{others:.0%} of the CPUs meanwhile)", ""]
    lines.append(f"top {rows} ops by self CPU time:")
    ka = prof.key_averages()
    lines.append(ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))
    lines.append("top ops by input shape:")
    lines.append(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=70))
    lines.append("per module (self CPU time of every op, forward by enclosing module; backward by the module whose "
                 "forward op created the autograd node):")
    lines.append(f"  {'module':<22} {'fwd s':>8} {'bwd s':>8} {'step s':>8} {'total s':>8} {'share':>7}  top ops")
    parts = sorted({l for l, _ in by_part}, key=lambda l: -sum(v for (x, _), v in by_part.items() if x == l))
    for label in parts:
        f = by_part.get((label, "fwd"), 0.0)
        b = by_part.get((label, "bwd"), 0.0)
        s = by_part.get((label, "step"), 0.0)
        ops = sorted(((v, op, ph) for (l, ph, op), v in by_part_op.items() if l == label), reverse=True)[:4]
        top = ", ".join(f"{op.replace('aten::', '')}[{ph}] {v / 1e6:.2f}" for v, op, ph in ops)
        lines.append(f"  {label:<22} {f / 1e6:8.3f} {b / 1e6:8.3f} {s / 1e6:8.3f} {(f + b + s) / 1e6:8.3f} "
                     f"{(f + b + s) / total:7.1%}  {top}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reporting
def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(args, cfg, machine, impls, peaks, flops, mem, first_losses, load_before, load_after, elapsed,
           profiles, quiet_waited=0.0) -> str:
    tokens = args.batch * args.seq
    cdt = "bf16" if args.dtype == "bf16" else "fp32"
    peak = peaks[cdt]
    lines = []
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    lines.append(f"## {now}: {args.preset}, {args.batch} x {args.seq} tokens, {precision_label(args)}")
    lines.append("")
    lines.append(f"Command: `{cmd}`")
    lines.append("")
    dev = machine.get("gpu", machine["cpu"])
    lines.append(f"Machine: {dev}; {machine['cores']} cores, {machine.get('ram_gib', '?')} GiB RAM; torch "
                 f"{machine['torch']}, transformers {machine['transformers']}, python {machine['python']}; "
                 f"{machine['threads']} intra-op threads; nanoseek git {machine['git']}; load average before "
                 f"{load_before}, after {load_after}.")
    lines.append("")
    lines.append(f"Model: preset `{args.preset}` without MTP: {impls[0].n_params:,} parameters "
                 f"({impls[0].n_active:,} activated per token with the embedding). Model FLOPs per token (matmuls, "
                 f"causal attention): forward {flops['forward'] / 1e6:.1f} M, training step "
                 f"{flops['train'] / 1e6:.1f} M (6 x {flops['active_matmul_params'] / 1e6:.2f} M active matmul params "
                 f"= {flops['six_n'] / 1e6:.1f} M "
                 f"without attention scores); {tokens} tokens per step.")
    lines.append("")
    lines.append(f"Measured matmul peak ({args.peak_size or 'auto'}-size torch.matmul, best of 8, before and after "
                 f"the steps): fp32 "
                 f"{peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; MFU below is against "
                 f"the {cdt} peak.")
    lines.append("")
    mem_head = "peak RSS | RSS before step" if args.device == "cpu" else "peak allocated | -"
    lines.append(f"| implementation | backend | first loss | median step (s) | tokens/s | vs nanoseek | MFU | "
                 f"best step (s) | best tokens/s | {mem_head} | param+grad+AdamW | CPU use | other procs |")
    lines.append("|---" * 14 + "|")

    def tps_of(impl, best=False):
        times = impl.clean(args.max_other)
        if not times:
            return float("nan")
        return tokens / (min(times) if best else statistics.median(times))

    nano = next((i for i in impls if i.name == "nanoseek"), None)
    base_tps = tps_of(nano) if nano else float("nan")
    for impl in impls:
        tps, best_tps = tps_of(impl), tps_of(impl, best=True)
        mfu = tps * flops["train"] / peak
        util = (statistics.median(c / w for c, w in zip(impl.cpu_times, impl.times)) / max(1, machine["threads"])
                if impl.times else float("nan"))
        others = statistics.median(impl.others) if impl.others else float("nan")
        if args.device == "cpu":
            m = mem.get(impl.name)
            memtxt = f"{fmt_bytes(m['maxrss'])} | {fmt_bytes(m['rss_before_step'])}" if m else "n/a | n/a"
        else:
            memtxt = (fmt_bytes(max(impl.peak_mem)) if impl.peak_mem else "n/a") + " | -"
        lines.append(f"| {impl.name} | {impl.info} | {first_losses.get(impl.name, float('nan')):.6f} | "
                     f"{tokens / tps:.2f} | {tps:,.0f} | {tps / base_tps:.2f}x | {mfu:.1%} | {tokens / best_tps:.2f} | "
                     f"{best_tps:,.0f} | {memtxt} | {fmt_bytes(impl.state)} | {util:.0%} | {others:.0%} |")
    lines.append("")
    for impl in impls:
        if nano and impl is not nano and impl.times and nano.times:
            lines.append(f"nanoseek / {impl.name} throughput: {base_tps / tps_of(impl):.2f}x on median steps, "
                         f"{tps_of(nano, True) / tps_of(impl, True):.2f}x on best steps.")
    if cdt != "fp32":
        lines.append("MFU against the fp32 peak instead (parts of a bf16 step may still run in fp32): " + ", ".join(
            f"{i.name} {tps_of(i) * flops['train'] / peaks['fp32']:.1%}" for i in impls) + ".")
    ref = first_losses.get("nanoseek")
    if ref is not None:
        diffs = [f"{n}: {abs(v - ref) / abs(ref):.2e}" for n, v in first_losses.items() if n != "nanoseek"]
        lines.append(f"Same weights check, relative difference of the first-step loss vs nanoseek: {', '.join(diffs)}.")
    lines.append("Losses per step (warmup included): " + "; ".join(
        f"{i.name} " + " ".join(f"{l:.5f}" for l in i.losses) for i in impls) + ".")
    lines.append("Step times (s, timed steps; * = left out, other processes above "
                 f"{args.max_other:.0%} of the CPUs): " + "; ".join(
                     f"{i.name} " + " ".join(f"{t:.2f}" + ("*" if o > args.max_other and len(i.clean(args.max_other))
                                                           < len(i.times) else "") for t, o in zip(i.times, i.others))
                     for i in impls) + ".")
    if args.device == "cpu":
        lines.append("Minor page faults / system CPU time (s) per timed step: " + "; ".join(
            f"{i.name} " + " ".join(f"{f:,}/{s:.2f}" for f, s in zip(i.faults, i.sys_times)) for i in impls) + ".")
    lines.append("")
    notes = [f"{args.warmup} warmup + {args.steps} timed steps per implementation, alternating in one process "
             "(the first implementation of each step rotates); tokens/s = batch x seq / median step time (over the "
             "steps not disturbed by other processes, see below); "
             f"one step = forward, cross-entropy, backward, AdamW(lr, betas 0.9/0.95, wd 0.1; {args.adamw} "
             "implementation) step, zero_grad. Timed rounds continue (at most --extra-steps more) until every "
             "implementation has --steps undisturbed steps."]
    if args.device == "cpu" and mem:
        notes.append("Peak RSS: high-water resident set (VmHWM of /proc/self/status; `getrusage` ru_maxrss would "
                     "inherit the parent's size through fork + exec) of a fresh child process that loads that "
                     "implementation alone and runs 2 steps; it includes the Python/torch/transformers runtime "
                     "(~0.5 GiB). RSS before step: the child's RSS with the weights loaded, before its first step "
                     "(AdamW state and gradients come after).")
    notes.append("CPU use: this process's CPU time / (wall time x threads); other procs: CPU time of every other "
                 "process (from /proc/stat) / (wall time x cores), both medians over the timed steps. The machine may "
                 "be shared: when other procs is well above 0%, the best step is the better estimate.")
    if args.wait_quiet and args.device == "cpu":
        notes.append(f"Before each timed step the run waited for other processes to leave the CPUs idle (<10% over "
                     f"1 s), {quiet_waited:.0f} s in all (budget {args.wait_quiet:.0f} s).")
    if args.note:
        notes.append(args.note)
    notes.append("Allocator: " + ("freed memory kept for reuse (`--malloc keep`, as `nanoseek train` does), for every "
                                  "implementation." if getattr(args, "malloc_applied", False) else
                                  "glibc's defaults (`--malloc default`)."))
    lines.append("Notes: " + " ".join(notes) + f" Wall time of the whole run: {elapsed:.0f} s.")
    lines.append("")
    for text in profiles:
        lines.append("<details><summary>profile</summary>\n\n```\n" + text + "\n```\n</details>\n")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.malloc == "keep":
        from nanoseek.allocator import keep_freed_memory
        args.malloc_applied = keep_freed_memory(args.device)
    if args.mem_child:
        mem_child(args)
        return
    t_start = time.perf_counter()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    from nanoseek import ModelConfig
    from nanoseek.model import count_parameters

    load_before = loadavg()
    machine = machine_info(args, device)
    cfg = ModelConfig.preset(args.preset).replace(num_nextn_predict_layers=0)
    print(f"machine: {machine}", flush=True)
    print(f"precision: {precision_label(args)}; preset {args.preset}; batch {args.batch} x seq {args.seq}", flush=True)

    quiet = QuietWaiter(args.wait_quiet if device.type == "cpu" else 0.0)
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        quiet()
        peaks[name] = measure_matmul_peak(dtype, device, args.peak_size)
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
    flops = flops_per_token(cfg, args.seq)
    print(f"model FLOPs/token: forward {flops['forward'] / 1e6:.1f} M, train {flops['train'] / 1e6:.1f} M "
          f"({', '.join(f'{k} {v / 1e6:.1f}' for k, v in flops['parts'].items())} M fwd)", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="nanoseek-bench-")
    ckpt = build_checkpoint(cfg, args.seed, Path(tmp.name))
    names = list(dict.fromkeys((args.impls if args.steps else []) + (args.profile_impls if args.profile else [])))
    if not names:
        raise SystemExit("nothing to do: --steps 0 without --profile")
    impls = []
    for name in names:
        t = time.perf_counter()
        impl = load_impl(name, ckpt, args, device)
        counts = count_parameters(impl.model) if name == "nanoseek" else None
        impl.n_params = sum(p.numel() for p in impl.model.parameters())
        impl.n_active = counts["activated_params"] if counts else None
        impls.append(impl)
        print(f"loaded {name}: {impl.info}; {impl.n_params:,} params in {time.perf_counter() - t:.1f} s", flush=True)
    n_ref = impls[0].n_params
    for impl in impls:
        if impl.n_params != n_ref:
            raise RuntimeError(f"{impl.name} has {impl.n_params:,} parameters, {impls[0].name} {n_ref:,}")
    if impls[0].n_active is None:
        nano = next((i for i in impls if i.n_active is not None), None)
        impls[0].n_active = nano.n_active if nano else 0

    timed = [i for i in impls if i.name in args.impls] if args.steps else []  # --steps 0: profile only
    first_losses = {}
    g = torch.Generator().manual_seed(args.seed + 1)  # the same batches as make_batches
    max_rounds = args.warmup + args.steps + (args.extra_steps if timed else 0)
    s = 0
    while timed and s < max_rounds:
        if s >= args.warmup + args.steps and all(
                sum(o <= args.max_other for o in i.others) >= args.steps for i in timed):
            break  # enough undisturbed steps
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
        order = timed[s % len(timed):] + timed[: s % len(timed)]
        for impl in order:
            if s >= args.warmup:
                quiet()
            loss = impl.step(ids, timed=s >= args.warmup)
            if s == 0:
                first_losses[impl.name] = loss
            kind = "warmup" if s < args.warmup else "step"
            extra = (f"  {impl.times[-1]:.3f} s  (other processes: {impl.others[-1]:.0%} of the CPUs; "
                     f"{impl.faults[-1]:,} page faults, {impl.sys_times[-1]:.2f} s system)" if s >= args.warmup else "")
            print(f"{kind} {s}: {impl.name:<9} loss {loss:.6f}{extra}", flush=True)
        if s == 0 and "nanoseek" in first_losses:
            ref = first_losses["nanoseek"]
            for n, v in first_losses.items():
                if n != "nanoseek":
                    rel = abs(v - ref) / abs(ref)
                    tol = 1e-5 if args.dtype == "fp32" else 2e-2
                    flag = "OK" if rel <= tol else "MISMATCH"
                    print(f"first-step loss: nanoseek {ref:.6f}  {n} {v:.6f}  rel diff {rel:.2e} [{flag}, tol {tol}]",
                          flush=True)
        s += 1

    if timed and device.type == "cpu":  # again after the steps: a busy moment at the start lowers the peak
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            quiet()
            peaks[name] = max(peaks[name], measure_matmul_peak(dtype, device, args.peak_size))
        print(f"matmul peak (best of start and end): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 "
              f"{peaks['bf16'] / 1e9:.1f} GFLOP/s", flush=True)

    profiles = []
    if args.profile:
        pbatch = make_batches(cfg, args, 1, device)[0]
        for impl in impls:
            if impl.name in args.profile_impls:
                if not impl.losses:
                    impl.step(pbatch, timed=False)  # warm (allocates AdamW state)
                quiet()
                text = (profile_compiled_step(impl, pbatch) if impl.compiled is not None
                        else profile_step(impl, pbatch, args.profile_rows))
                print(text, flush=True)
                profiles.append(text)

    main_maxrss = maxrss_bytes()
    mem = {}
    if args.device == "cpu" and args.mem == "child" and timed:
        for impl in impls:  # free this process's models first
            impl.model = impl.opt = None
        mem = run_mem_children(args, ckpt)
    tmp.cleanup()
    load_after = loadavg()
    elapsed = time.perf_counter() - t_start
    if not timed:
        return
    text = report(args, cfg, machine, timed or impls, peaks, flops, mem, first_losses, load_before, load_after,
                  elapsed, profiles, quiet.waited)
    text += f"\nMain process max RSS (all implementations loaded together): {fmt_bytes(main_maxrss)}.\n"
    print("\n" + text)
    if not args.no_write and timed:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = "" if out.exists() else (
            "# Training step: nanoseek vs transformers\n\nAppended by `benchmarks/train_step.py` (see its docstring "
            "for the method). Newest sections at the bottom.\n\n")
        with out.open("a") as f:
            f.write(header + text + "\n")
        print(f"appended to {out}")


if __name__ == "__main__":
    main()
