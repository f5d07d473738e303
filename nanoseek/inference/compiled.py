"""Decoding steps compiled with torch.compile (Inductor): ``generate(..., compile=True)``.

A decoding step of a small model on the CPU is bound by dispatch: each of its few hundred operations costs a
few microseconds of Python and dispatcher time whatever its size (the demo model: ~2 ms per token in eager
mode). Compiled, a step is one call into generated C++ (Inductor's C++ wrapper) that fuses the elementwise
work: the demo model decoded 1,636 tokens/s against 375 in eager mode (benchmarks/results/speculative.md).

A whole step is one graph (``fused_step``): a plain step is the forward, the choice of the next token and its
bookkeeping (``generate.plain_step``); a speculative step is the verification, the acceptance rule, the
bookkeeping and the MTP drafting with its int8 head (``speculative.speculative_step``). Sampling takes its
uniform numbers as inputs, drawn before the call in the eager step's order, so seeded outputs match eager
decoding. With the verification and the drafting as separate graphs and the acceptance between them in eager
mode, speculative decoding of the demo run was 0.87x compiled plain decoding (greedy); as one graph, 1.12x.

What makes a step one graph with static shapes:
- the model's compile-aware paths: attention over all of the cache's slots behind the mask (rather than up to
  the highest slot reached), RoPE in real arithmetic, and the routed experts as products over weights gathered
  per (token, expert) slot (``experts.gathered_swiglu``) rather than a sort by expert with data-dependent groups.
  When a step's slots outnumber the experts (a larger batch), every expert runs on each token instead
  (``experts.every_expert_swiglu``). With the sorted path, such a step split into pieces that compiled again as
  their sizes changed: 5 prompts on the demo model decoded at 3-11 tokens/s after the first step, against
  1,195-1,208 as one graph (eager: 402-493);
- ``few_row_linear``: a linear layer over at most FEW_ROWS rows is rewritten into one reduction per row over
  the weight's rows, which Inductor fuses into a single pass over the weight with one accumulator per row.
  The BLAS product's time grows with each row: the demo model's 8192 x 256 output head took 242 us for
  2 rows against 134 us for 1 (fp32, 2 threads), the fused reduction 82 us against 70 us. The whole step
  went from 0.63 to 0.55 ms for 1 token and from 1.11 to 0.79 ms for 2 (speculative verification).

In fp32 a compiled step gives the eager step's logits within ~1e-6 (greedy outputs were identical in every
test). In bf16 the two round differently: the demo model's logits were off fp32 by 0.0058 on average compiled
against 0.0085 eager, and bf16 logits often tie, so greedy outputs can part at such a tie.

Compilation takes seconds per step: the first step for each batch size, mode (plain or speculative) and set of
sampling parameters (greedy, or temperature / top-k / top-p, which are constants of the graph); the request
length is a dynamic size from the first call (see ``fused_step``). So it pays off for long generations and for
repeated requests with the same settings (torch.compile keeps at most 8 variants of a step, then runs new ones
eagerly); the eager path stays the default.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .cache import LatentCache

FEW_ROWS = 4  # linear layers over at most this many rows become fused reductions (see the module docstring)


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., K) of at most FEW_ROWS rows: row m of the result is the reduction
    sum_k W[n, k] x_m[k] over the weight's rows; the M reductions read the same weight, and Inductor fuses them
    into one loop over it (M accumulators). Exact up to the order of the summation."""
    rows = x.reshape(-1, x.shape[-1])  # (M, K)
    out = torch.stack([(weight * rows[m]).sum(-1) for m in range(rows.shape[0])])  # (M, N)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])  # (..., N)


def rewrite_few_row_linears(gm: torch.fx.GraphModule) -> int:
    """Point every linear of the traced graph whose input has at most FEW_ROWS rows at ``few_row_linear``;
    returns how many were rewritten."""
    rewritten = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch._C._nn.linear, F.linear):
            continue
        x = node.args[0].meta.get("example_value") if isinstance(node.args[0], torch.fx.Node) else None
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and all(isinstance(s, int) for s in x.shape) \
                and x.shape[-1] > 0 and x.numel() // x.shape[-1] <= FEW_ROWS:
            node.target = few_row_linear
            rewritten += 1
    gm.recompile()
    return rewritten


def decoding_backend(gm: torch.fx.GraphModule, example_inputs):
    """torch.compile backend: rewrite the few-row linears, then compile with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    rewrite_few_row_linears(gm)
    return compile_fx(gm, example_inputs, config_patches={"cpp_wrapper": True})


def _step_inputs(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The step's inputs (a few ids and hidden states) as copies with standard strides, their sizes (batch,
    tokens per step) marked static. A slice's strides depend on the request and would be guarded on; a second
    size would make the graph generic in it and lose the few-row linears. The cache length, the one size that
    changes with every request, is dynamic (``_mark_cache``)."""
    fresh = [t.clone(memory_format=torch.contiguous_format) if t is not None else None for t in tensors]
    for t in fresh:
        for dim in range(t.dim() if t is not None else 0):
            torch._dynamo.mark_static(t, dim)
    return fresh


def _mark_cache(cache: LatentCache) -> None:
    """The cache buffers (B, slots, d_c + d_R): the batch static, the request length dynamic from the first call
    (see ``fused_step``)."""
    for layer in cache.layers + cache.mtp_layers:
        torch._dynamo.mark_static(layer.kv, 0)
        torch._dynamo.maybe_mark_dynamic(layer.kv, 1)


def _main_step(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor,
               cache) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = model.forward_cached(ids, positions, cache)  # (B, T, d), absorbed attention
    return hidden, model.lm_head(hidden)  # (B, T, V)


@functools.cache
def _compiled(step: Callable) -> Callable:
    """One torch.compile wrapper per step function, shared by every model: the model is an argument, so its
    parameters are graph inputs (another model of the same shapes reuses the graphs; any other compiles its own)."""
    return torch.compile(step, backend=decoding_backend)


def main_step(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor,
              cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Compiled main step: tokens (B, T) at cache slots ``positions`` (B, T) -> final normed hidden state
    (B, T, d) and main-head logits (B, T, V), as ``model.forward_cached`` and ``model.lm_head``."""
    ids, positions = _step_inputs(ids, positions)
    _mark_cache(cache)
    return _compiled(_main_step)(model, ids, positions, cache)


def fused_step(step: Callable) -> Callable:
    """``step`` (a whole decoding step: forward, token choice, bookkeeping) compiled into one graph.

    Sizes: the batch (dim 0 of every tensor argument and cache buffer) is static, since the step's few-row linears
    need it; the request length (dim 1 of the ``tokens`` buffer and of the cache buffers) is dynamic from the
    first call, so a request of another length runs the same graph. Left to torch.compile's automatic dynamic
    shapes, the first request compiled a graph for its own length and the second compiled the step again (tens of
    seconds each on a 2-core CPU). The generic graph may cost a little per step: in alternating runs of the demo
    model, plain steps ran 3-6% slower than length-specialized ones, within the machine's noise (results in
    benchmarks/results/speculative.md). The step's other inputs are whole tensors (no slices, whose strides would
    be guarded on), so none is copied."""
    compiled = _compiled(step)
    tokens_at = list(inspect.signature(step).parameters).index("tokens")

    def call(*args):
        for i, t in enumerate(args):
            if isinstance(t, torch.Tensor):
                torch._dynamo.mark_static(t, 0)
                if i == tokens_at:
                    torch._dynamo.maybe_mark_dynamic(t, 1)  # (B, slots)
            elif isinstance(t, LatentCache):
                _mark_cache(t)
            elif isinstance(t, (list, tuple)):
                for u in t:
                    if isinstance(u, torch.Tensor):
                        torch._dynamo.mark_static(u, 0)
        return compiled(*args)

    return call
