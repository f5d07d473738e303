"""Turning logits into tokens: temperature, top-k, top-p (nucleus), all in fp32, reproducible with a generator."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError (one line) for sampling parameters that define no distribution."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def logits_to_probs(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """The sampling distribution (..., V) in fp32. Temperature 0 is greedy: a one-hot on the argmax.

    top_k keeps the k largest logits; top_p keeps the smallest set of most likely tokens whose probability
    reaches top_p (the most likely token is always kept). Both apply after the temperature.
    """
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # probability mass strictly ahead of each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # drop tokens once top_p is reached
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sampling_distribution(temperature: float, top_k: int | None = None, top_p: float | None = None) -> Callable:
    """``logits_to_probs`` with these parameters bound: the function a decoding step turns logits into its
    sampling distribution with. The compiled steps take it as an argument; torch.compile guards on the bound
    values, so later requests with the same parameters reuse the compiled steps (tests/test_compiled.py)."""
    return functools.partial(logits_to_probs, temperature=temperature, top_k=top_k, top_p=top_p)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
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
    return token.view(probs.shape[:-1])
