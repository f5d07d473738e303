"""``generate``: batched prompts of different lengths -> new tokens, greedy or sampled, plain or speculative.

Prompts are right-padded and prefilled in chunks; each sequence then lives at its own cache slots (slot =
token index = RoPE position, see :class:`LatentCache`), so no padding ever enters the attention. Prefill
uses the up-projected attention over the cached latent while the cached prefix is short (the attention
switches to the absorbed form past its EXPANDED_KV_BUDGET); every later step uses the absorbed attention.
"""

from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .cache import LatentCache
from .compiled import fused_step
from .sampling import check_sampling, sample, sampling_distribution
from .speculative import MTPSpeculator, chunks


@dataclass
class GenerationStats:
    """Throughput, cache size and (speculative decoding) acceptance of one ``generate`` call.

    prefill_tokens_per_s: prompt tokens (all sequences) / time to the first new token (MTP prefill included).
    decode_tokens_per_s: new tokens after the first of each sequence / time after prefill; with ``compile``,
    after the first decoding step (which compiles the step when its shape is new): see first_step_s.
    cache_bytes: bytes of the latent cache allocated for the request (MTP layers included when speculative).
    drafted / accepted: draft tokens proposed / accepted for sequences still running (0 when not speculative).
    acceptance_rate: accepted / drafted, None when not speculative.
    accepted_per_depth[k]: steps in which the draft of depth k + 1 was accepted (it needs depths 1..k too);
    acceptance_rate_per_depth[k] = accepted_per_depth[k] / draft steps.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    decode_steps: int = 0
    first_step_s: float = 0.0
    compiled: bool = False
    cache_bytes: int = 0
    speculative: bool = False
    drafted: int = 0
    accepted: int = 0
    acceptance_rate: float | None = None
    draft_steps: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)
    acceptance_rate_per_depth: list[float] = field(default_factory=list)


@dataclass
class GenerationResult:
    """tokens[i]: the new tokens of prompt i (prompt excluded). A sequence ends after max_new_tokens tokens or
    at the first stop token, which is then its last token. stats: :class:`GenerationStats`."""

    tokens: list[list[int]]
    stats: GenerationStats


class _Output:
    """Collects accepted tokens per sequence, applies max_new_tokens and stop tokens, streams them."""

    def __init__(self, batch: int, max_new_tokens: int, stop_tokens: set[int], on_tokens: Callable | None):
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.max_new_tokens, self.stop_tokens, self.on_tokens = max_new_tokens, stop_tokens, on_tokens

    def emit(self, new: list[list[int]]) -> int:
        """Append each running sequence's new tokens; return how many were kept."""
        kept: list[list[int]] = []
        for i, toks in enumerate(new):
            out: list[int] = []
            for t in toks if not self.done[i] else ():
                out.append(t)
                if t in self.stop_tokens or len(self.tokens[i]) + len(out) == self.max_new_tokens:
                    self.done[i] = True
                    break
            self.tokens[i].extend(out)
            kept.append(out)
        if self.on_tokens is not None:
            self.on_tokens(kept)
        return sum(map(len, kept))


def plain_step(model: torch.nn.Module, tokens: torch.Tensor, cache: LatentCache, n: torch.Tensor, active: torch.Tensor,
               to_probs: Callable | None, uniforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain decoding step as a function of tensors (with ``compile``, one graph): the main model on each
    sequence's newest token t_n at slot n (B,), the next token from its logits (argmax, or sampled with the
    (B, 1) draw ``uniforms[0]``), written to ``tokens`` at n + 1 for the sequences still ``active`` (B,).
    Returns the new tokens (B,) and the new n (B,)."""
    rows = torch.arange(n.shape[0], device=n.device)
    hidden = model.forward_cached(tokens[rows, n][:, None], n[:, None], cache)  # (B, 1, d)
    logits = model.lm_head(hidden[:, 0])  # (B, V)
    new = logits.argmax(dim=-1) if to_probs is None else sample(to_probs(logits), u=uniforms[0])
    n = n + active.long()
    tokens[rows, n] = torch.where(active, new, tokens[rows, n])
    return new, n


def _check_request(model: torch.nn.Module, prompts, max_new_tokens, stop_tokens, seed):
    """Raise ValueError (one line) for a request generate cannot run; else return (prompts as lists of ints,
    max_new_tokens, stop tokens as a tuple, seed), with numpy / torch integers and 1-D tensors accepted."""
    cfg = model.config
    if getattr(prompts, "ndim", None) == 2 and hasattr(prompts, "tolist"):  # a tensor or numpy array
        prompts = prompts.tolist()  # (B, T): B prompts of T tokens
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}")
    checked = []
    for i, p in enumerate(prompts):
        if getattr(p, "ndim", None) == 1 and hasattr(p, "tolist"):  # a tensor or numpy array of ids
            p = p.tolist()
        if isinstance(p, numbers.Integral):
            raise ValueError(f"prompt {i} is a single id ({p!r}), not a list: prompts is a list of prompts, "
                             f"e.g. [[1, 2, 3]]")
        if not isinstance(p, (list, tuple)):
            raise ValueError(f"prompt {i} must be a list of token ids, got {type(p).__name__}")
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in p):
            raise ValueError(f"prompt {i} holds something other than integer token ids")
        p = [int(t) for t in p]
        if not all(0 <= t < cfg.vocab_size for t in p):
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={cfg.vocab_size})")
        checked.append(p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    longest = max(map(len, checked))
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    if stop_tokens is None:
        stop_tokens = ()
    if isinstance(stop_tokens, (str, bytes, numbers.Number)) or not isinstance(stop_tokens, Iterable):
        raise ValueError(f"stop_tokens must be a collection of token ids, e.g. [eos_id], got {stop_tokens!r}")
    stop_tokens = tuple(stop_tokens)
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in stop_tokens):
        raise ValueError(f"stop_tokens must be token ids (ints), got {list(stop_tokens)!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not -2**63 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {seed!r}")
    return checked, max_new_tokens, tuple(int(t) for t in stop_tokens), None if seed is None else int(seed)


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens: Iterable[int] = (),
             seed: int | None = None, speculative: bool = False, compile: bool = False,
             on_tokens: Callable[[list[list[int]]], None] | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    Args:
        model: a :class:`~nanoseek.model.DeepSeekV3` (any dtype / device; the cache follows the model).
        prompts: token ids per sequence; lengths may differ.
        temperature: 0 (default) is greedy; otherwise the logits are divided by it. top_k / top_p: keep the k
            most likely tokens / the smallest set reaching probability top_p. Sampling runs in fp32.
        stop_tokens: a sequence ends at the first of these it produces (kept as its last token).
        seed: seeds a private generator, so a call is reproducible; None uses torch's global RNG.
        speculative: draft with the model's MTP modules and verify with the main model (the output
            distribution is the main model's; greedy output is identical to plain greedy). Without MTP
            modules: a warning, then plain decoding.
        compile: run the decoding steps through torch.compile (:mod:`nanoseek.inference.compiled`): the first
            steps of each shape compile (seconds), later steps are several times faster on the CPU.
        on_tokens: called after every step with the tokens each sequence accepted in it (streaming).

    Raises:
        ValueError: empty prompts, ids outside the vocabulary, invalid sampling parameters, or a prompt +
            max_new_tokens longer than ``config.max_position_embeddings``.
    """
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    prompts, max_new_tokens, stop_tokens, seed = _check_request(model, prompts, max_new_tokens, stop_tokens, seed)
    if speculative and len(model.mtp) == 0:
        warnings.warn("speculative=True but the model has no MTP module (num_nextn_predict_layers=0): "
                      "decoding without speculation", stacklevel=2)
        speculative = False

    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    # greedy picks the argmax directly: the same token as sampling its one-hot distribution, without forming it
    to_probs = None if temperature == 0 else sampling_distribution(temperature, top_k, top_p)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
        return logits.argmax(dim=-1) if to_probs is None else sample(to_probs(logits), generator)

    B, depth = len(prompts), len(model.mtp) if speculative else 0
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    P = int(lengths.max())
    # slots: prompt + new tokens; speculation also writes the D drafts past the last accepted token
    cache = LatentCache.for_model(model, B, P + max_new_tokens + depth, mtp=speculative)
    tokens = torch.zeros(B, P + max_new_tokens + depth + 1, dtype=torch.long, device=device)  # ids per slot
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, device=device)
    rows = torch.arange(B, device=device)
    out = _Output(B, max_new_tokens, set(stop_tokens), on_tokens)
    stats = GenerationStats(prompt_tokens=int(lengths.sum()), cache_bytes=cache.nbytes, speculative=speculative,
                            accepted_per_depth=[0] * depth, compiled=compile)

    # prefill: the right-padded prompts in chunks (padding only fills slots each sequence overwrites later)
    start = time.perf_counter()
    # (memory: the cache plus one chunk's activations; only speculation keeps every position's hidden state,
    # which the MTP modules need, and attention switches to latent math when the prefix grows large)
    positions = torch.arange(P, device=device).expand(B, P)  # (B, P)
    last = torch.zeros(B, model.config.hidden_size, device=device, dtype=model.embed_tokens.weight.dtype)
    kept = []
    for s, e in chunks(P):
        h = model.forward_cached(tokens[:, s:e], positions[:, s:e], cache, absorb=False)  # (B, e - s, d)
        ends_here = (lengths - 1 >= s) & (lengths - 1 < e)  # sequences whose last prompt token is in this chunk
        last[ends_here] = h[rows[ends_here], (lengths - 1 - s)[ends_here]].to(last.dtype)
        if speculative:
            kept.append(h)
    logits = model.lm_head(last)  # (B, V)
    if not torch.isfinite(logits).all():  # NaN would silently sample token 0 at every step
        raise ValueError(f"the model's logits after the prompt are not finite (NaN or inf): its weights hold NaN or "
                         f"inf, or the computation overflows in {logits.dtype}")
    first = pick(logits)  # (B,)
    n = lengths.clone()  # slot of the newest accepted token t_n, not yet seen by the main model
    tokens[rows, n] = first
    if speculative:
        speculator = MTPSpeculator(model, cache, tokens, to_probs, generator, compiled=compile)
        speculator.prefill(torch.cat(kept, dim=1), lengths)  # (B, P, d)
    stats.new_tokens = out.emit([[t] for t in first.tolist()])
    stats.prefill_s = time.perf_counter() - start

    # decode: one token per step, or the accepted drafts + one per step
    step = fused_step(plain_step) if compile else plain_step
    start = time.perf_counter()
    while not all(out.done):
        running = [not d for d in out.done]
        active = torch.tensor(running, device=device)
        if speculative:
            new, n_accepted, n = speculator.step(n, active)
            n_acc = n_accepted.tolist()
            accepted = [a for a, r in zip(n_acc, running) if r]  # per running sequence
            counts = [a + 1 for a in n_acc]
            stats.draft_steps += len(accepted)
            stats.drafted += depth * len(accepted)
            stats.accepted += sum(accepted)
            for k in range(depth):
                stats.accepted_per_depth[k] += sum(a > k for a in accepted)
        else:
            # the sampling draw (B, 1), as sample() would draw it: an input of the compiled step
            uniforms = [] if to_probs is None else [torch.rand((B, 1), generator=generator, dtype=torch.float64,
                                                               device=device)]
            new, n = step(model, tokens, cache, n, active, to_probs, uniforms)
            new = new[:, None]  # (B, 1)
            counts = [1] * B
        stats.decode_steps += 1
        stats.new_tokens += out.emit([row[:c] for row, c in zip(new.tolist(), counts)])
        if stats.decode_steps == 1:
            stats.first_step_s, first_step_tokens = time.perf_counter() - start, stats.new_tokens
    stats.decode_s = time.perf_counter() - start

    stats.prefill_tokens_per_s = stats.prompt_tokens / stats.prefill_s if stats.prefill_s > 0 else 0.0
    decoded, decode_s = stats.new_tokens - B, stats.decode_s
    if compile and stats.decode_steps > 1:  # leave out the first step: it compiles
        decoded, decode_s = stats.new_tokens - first_step_tokens, decode_s - stats.first_step_s
    stats.decode_tokens_per_s = decoded / decode_s if decode_s > 0 else 0.0
    if speculative:
        stats.acceptance_rate = stats.accepted / stats.drafted if stats.drafted else 0.0
        stats.acceptance_rate_per_depth = [a / stats.draft_steps if stats.draft_steps else 0.0
                                           for a in stats.accepted_per_depth]
    return GenerationResult(out.tokens, stats)
