"""Turning logits into tokens: temperature, top-k, top-p (nucleus), all in fp32, reproducible with a generator."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> tuple[float, int | None,
                                                                                   float | None]:
    """Raise ValueError (one line) for sampling parameters that define no distribution; else return them as
    Python numbers (numpy's are accepted)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    return float(temperature), None if top_k is None else int(top_k), None if top_p is None else float(top_p)


def logits_to_probs(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """The sampling distribution (..., V) in fp32. Temperature 0 is greedy: a one-hot on the argmax.

    top_k keeps the k largest logits; top_p keeps the smallest set of most likely tokens whose probability
    reaches top_p (the most likely token is always kept). Both apply after the temperature.
    """
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # (l - max l) / T: the largest is 0, so a tiny temperature cannot overflow to inf (softmax would give NaN)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = nucleus(probs, top_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


# top-p looks for its nucleus among this many most likely tokens first, then among the next number of them, and
# sorts the whole vocabulary only when those do not hold it (see ``nucleus``)
TOP_P_CANDIDATES = (64, 512)


def _keep_prefix(sorted_probs: torch.Tensor, order: torch.Tensor, probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (..., V) with only the most likely tokens kept, from some of them sorted in descending order
    (``sorted_probs`` and their ids ``order``, (..., n)): a token is dropped once the mass strictly ahead of it
    reaches top_p."""
    before = sorted_probs.cumsum(-1) - sorted_probs  # probability mass strictly ahead of each token
    dropped = before >= top_p  # (..., n)
    dropped[..., 0] = False  # the most likely token, also when top_p rounds to 0 in fp32 (below ~1e-45)
    kept = sorted_probs.masked_fill(dropped, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, kept)


def nucleus(probs: torch.Tensor, top_p: float, candidates: tuple[int, ...] = TOP_P_CANDIDATES) -> torch.Tensor:
    """The top-p nucleus of probs (..., V), not renormalized: the smallest set of most likely tokens whose mass
    reaches top_p, the rest set to 0.

    Sorting the whole vocabulary is slow on the CPU: 0.7-0.9 ms per row for 8192 tokens here, more than the rest
    of the demo model's decoding step when compiled. So the nucleus is taken from the k most likely tokens
    (``topk``: ~50 us for k = 64, ~160 us for 512) when they hold top_p of the mass, for each k of
    ``candidates`` in turn. That is the same set as a full sort gives, except which of several tokens of equal
    probability at the boundary is kept (a sort and ``topk`` order ties differently; the demo model's rows had
    such ties in 11% of its sampled steps). Only if no k holds the nucleus is everything sorted. On the demo model at
    temperature 0.6, top-p 0.95, the nucleus held at most 64 tokens in 73% of the steps and at most 1024 in all.
    Compiled, each choice is a ``torch.cond``, so the step stays one graph.
    """
    k = candidates[0] if candidates else probs.shape[-1]
    if k >= probs.shape[-1]:
        return _keep_prefix(*probs.sort(dim=-1, descending=True), probs, top_p)
    head, head_ids = probs.topk(k, dim=-1)  # (..., k), descending
    enough = (head.sum(-1) >= top_p).all()  # every row's nucleus lies among its k most likely tokens

    def from_head(p: torch.Tensor, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return _keep_prefix(h, ids, p, top_p)

    def from_more(p: torch.Tensor, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return nucleus(p, top_p, candidates[1:])

    if torch.compiler.is_compiling():
        return torch.cond(enough, from_head, from_more, (probs, head, head_ids))
    return (from_head if enough else from_more)(probs, head, head_ids)


def sampling_distribution(temperature: float, top_k: int | None = None, top_p: float | None = None) -> Callable:
    """``logits_to_probs`` with these parameters bound: the function a decoding step turns logits into its
    sampling distribution with. The compiled steps take it as an argument; torch.compile guards on the bound
    values, so later requests with the same parameters reuse the compiled steps (tests/test_compiled.py)."""
    return functools.partial(logits_to_probs, temperature=temperature, top_k=top_k, top_p=top_p)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None,
           u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of probs (..., V) -> (...,), by inverting the cumulative distribution.

    One uniform number per row: the token is the first i with F(i) > u * F(V-1), F the running sum in fp64, so
    a token of probability 0 (a flat step of F) is never drawn and a one-hot row (greedy) gives its token.
    ``torch.multinomial`` draws V exponentials per row instead: for V = 8192 that alone took as long as
    the output head of the demo model on this machine. ``u`` (N, 1) fp64, N = rows: the uniform numbers, if
    drawn already (a compiled step takes them as inputs); else drawn from ``generator``.
    """
    flat = probs.reshape(-1, probs.shape[-1])  # (N, V)
    cdf = flat.double().cumsum(dim=-1)  # (N, V) F(i)
    if u is None:
        u = torch.rand(flat.shape[0], 1, generator=generator, dtype=torch.float64, device=flat.device)  # (N, 1)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (N, 1)
    last = (cdf < cdf[:, -1:]).sum(dim=-1, keepdim=True)  # the last token of nonzero probability (N, 1)
    token = torch.minimum(token, last)  # u * F(V-1) rounded up to F(V-1) itself would land past it
    return token.view(probs.shape[:-1])  # (N, 1) -> (...,)
