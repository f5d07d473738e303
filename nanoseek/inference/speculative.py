"""Speculative decoding with the model's own MTP modules as the draft model (SPEC §5; DeepSeek-V3 §5.4.3).

Each step: the D MTP modules draft d_1..d_D from the main model's last hidden state; the main model scores
[t_n, d_1, ..., d_D] in one forward; the drafts are accepted by the speculative-sampling rule (Leviathan et
al. 2023, Chen et al. 2023), which keeps the output distribution exactly the main model's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .cache import LatentCache
from .compiled import fused_step
from .draft_head import DraftHead
from .sampling import sample


PREFILL_CHUNK = 512  # prompt tokens per prefill forward: bounds the (B, H, chunk, S) attention scores


def chunks(length: int, size: int | None = None) -> list[tuple[int, int]]:
    """[(start, stop)) spans covering 0..length in pieces of at most ``size`` (default PREFILL_CHUNK)."""
    size = size or PREFILL_CHUNK
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def speculative_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       generator: torch.Generator | None = None, u: torch.Tensor | None = None,
                       u_next: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023), batched.

    Args:
        draft_tokens: (B, D) d_1..d_D, drawn from draft_probs.
        draft_probs: (B, D, V) q_j, the distribution d_j was drawn from.
        target_probs: (B, D + 1, V) p_j, the main model's distribution for the same slot as q_j; p_D is the
            distribution after all D drafts (for the bonus token).
        generator: draws the uniform numbers, unless they are given: ``u`` (B, D) for the tests and ``u_next``
            (B, 1) fp64 for the next token (see :func:`~nanoseek.inference.sampling.sample`).

    Returns:
        n_accepted (B,) in 0..D: d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)), stopping at the
        first rejection; next_token (B,): after a rejection, a sample from norm(max(0, p_j - q_j)); if every
        draft was accepted, a bonus sample from p_D.
    """
    B, D = draft_tokens.shape
    p = target_probs[:, :D].gather(-1, draft_tokens[..., None])[..., 0]  # p_j(d_j) (B, D)
    q = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]  # q_j(d_j) (B, D)
    if u is None:
        u = torch.rand(B, D, generator=generator, device=p.device)
    accepted = u * q < p  # P(u < p / q) = min(1, p / q)
    n_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)  # length of the accepted prefix (B,)
    rows = torch.arange(B, device=p.device)
    q_padded = torch.cat((draft_probs, draft_probs.new_zeros(B, 1, draft_probs.shape[-1])), dim=1)  # (B, D + 1, V)
    p_next = target_probs[rows, n_accepted]  # (B, V)
    residual = (p_next - q_padded[rows, n_accepted]).clamp(min=0)  # = p_D itself when all D were accepted
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)  # p == q: no rejection possible
    return n_accepted, sample(residual / residual.sum(-1, keepdim=True), generator, u=u_next)


def verification_logits(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The main head over the verified positions: hidden (B, T, d) -> logits (B, T, V), exactly lm_head's.

    For fp32 on the CPU it is computed as W @ h^T, (V, d) @ (d, B*T): with 2 rows, the (2 x d) @ (d x V) form
    ran at about half the speed for the demo model's 8192 x 256 head when cold, and this form made speculative
    decoding on the demo run 1.07x faster (median of 8 interleaved passes). For bf16 it is slower: kept as is.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return F.linear(hidden, weight)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B * T, d)
    return (weight @ flat.T).T.reshape(*hidden.shape[:-1], weight.shape[0])  # (B, T, V)


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule at temperature 0, where p and q are one-hot: d_j is accepted iff it is the
    main model's argmax, and the next token is the argmax after the accepted prefix. Same result as
    ``speculative_accept`` on the one-hot distributions, without forming them.

    draft_tokens (B, D), target_logits (B, D + 1, V) -> n_accepted (B,), next_token (B,).
    """
    D = draft_tokens.shape[1]
    target = target_logits.argmax(dim=-1)  # (B, D + 1)
    n_accepted = (draft_tokens == target[:, :D]).long().cumprod(dim=-1).sum(dim=-1)  # (B,)
    return n_accepted, target.gather(1, n_accepted[:, None])[:, 0]  # (B, 1) -> (B,)


def draw_uniforms(generator: torch.Generator | None, batch: int, depth: int, device: torch.device,
                  accept: bool = True) -> list[torch.Tensor]:
    """The uniform numbers one speculative step consumes, drawn up front in the order the rule uses them:
    the acceptance tests (B, D) and the resample after them (B, 1) (``accept``), then one draw (B, 1) per draft
    depth. Drawing them before the step lets the whole step run as one compiled graph with the same random
    stream as the eager step."""
    shapes = [((batch, depth), torch.float32), ((batch, 1), torch.float64)] if accept else []
    shapes += [((batch, 1), torch.float64)] * depth
    return [torch.rand(shape, generator=generator, dtype=dtype, device=device) for shape, dtype in shapes]


def draft(model: torch.nn.Module, head: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
          cache: LatentCache, h: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, to_probs: Callable | None,
          uniforms: list[torch.Tensor], absorb: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MTP modules k = 1..D at ``positions`` (B, T); position i combines h^{k-1}_i (``h``: B x T x d) with
    Emb(t_{i+k}), the ids read from ``tokens`` (B, slots).

    The draft d_k (for slot n + k) comes from position n - 1 = positions[b, last[b]]; it is written to ``tokens``
    at n + k so that module k + 1 can embed it. Module D's output is needed at that position only: its other
    positions just write their cache slots (``outputs_at``), skipping queries and the MoE. ``uniforms``: one
    (B, 1) draw per depth when sampling. Returns drafts (B, D) and their q (B, D, V) (None when greedy).
    """
    B = h.shape[0]
    rows = torch.arange(B, device=h.device)
    n = positions[rows, last] + 1
    spans = chunks(positions.shape[1])
    drafts, probs = [], []
    for k in range(1, len(model.mtp) + 1):
        outs = []
        for s, e in spans:
            at = (last - s).clamp(0, e - s - 1)[:, None] if k == len(model.mtp) else None  # (B, 1)
            outs.append(model.mtp_forward_cached(k, h[:, s:e], tokens.gather(1, positions[:, s:e] + k),
                                                 positions[:, s:e], cache, absorb=absorb, outputs_at=at))
            # outs[-1]: (B, e - s or 1, d) = RMSNorm_k(h^k)
        if k < len(model.mtp):
            h = torch.cat(outs, dim=1)  # (B, T, d)
            h_last = h[rows, last]  # (B, d)
        else:
            span = last // (spans[0][1] - spans[0][0])  # the span holding each row's position n - 1
            h_last = torch.stack([o[:, 0] for o in outs], dim=1)[rows, span]  # (B, d)
        logits = head(h_last)  # (B, V): predicts t_{n+k}
        if to_probs is None:
            d_k = logits.argmax(dim=-1)
        else:
            probs.append(to_probs(logits))
            d_k = sample(probs[-1], u=uniforms[k - 1])
        tokens[rows, n + k] = d_k
        drafts.append(d_k)
    return torch.stack(drafts, dim=1), torch.stack(probs, dim=1) if probs else None


def speculative_step(model: torch.nn.Module, head: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                     cache: LatentCache, n: torch.Tensor, active: torch.Tensor, drafts: torch.Tensor,
                     draft_probs: torch.Tensor | None, h_tail: torch.Tensor, to_probs: Callable | None,
                     uniforms: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One step of :class:`MTPSpeculator` as a function of tensors (so that it compiles into one graph): verify
    the pending ``drafts`` (B, D) at slots n+1..n+D, accept, draft again from the new head.

    Sequences not ``active`` (B,) do not move. ``uniforms``: :func:`draw_uniforms` (empty when greedy).
    Returns new tokens (B, D + 1) of which the first n_accepted + 1 are real, n_accepted (B,), the new n (B,),
    the new drafts (B, D) and their q (B, D, V) or None, and the new h_tail (B, W, d).
    """
    D, W = drafts.shape[1], h_tail.shape[1]
    rows = torch.arange(n.shape[0], device=n.device)
    # 1. verify: the main model scores [t_n, d_1..d_D] at slots n..n+D in one forward
    positions = n[:, None] + torch.arange(D + 1, device=n.device)  # (B, D + 1)
    hidden = model.forward_cached(tokens.gather(1, positions), positions, cache)  # (B, D + 1, d)
    if torch.compiler.is_compiling():  # few-row linear: one fused pass over the head (nanoseek.inference.compiled)
        target_logits = model.lm_head(hidden)  # (B, D + 1, V)
    else:
        target_logits = verification_logits(model.lm_head.weight, hidden)  # (B, D + 1, V)
    if to_probs is None:
        n_accepted, next_token = greedy_accept(drafts, target_logits)
    else:
        n_accepted, next_token = speculative_accept(drafts, draft_probs, to_probs(target_logits),
                                                    u=uniforms[0], u_next=uniforms[1])
        uniforms = uniforms[2:]
    advance = torch.where(active, n_accepted + 1, 0)
    # a sequence that runs past max_new_tokens here is finished; the clamp keeps its (ignored) slots in range
    new_n = (n + advance).clamp(max=tokens.shape[1] - D - 2)
    advance = new_n - n
    # d_1..d_a already sit at slots n+1..n+a; the corrected / bonus token goes after them
    tokens[rows, new_n] = torch.where(active, next_token, tokens[rows, new_n])
    new_tokens = torch.cat((drafts, next_token[:, None]), dim=1)  # (B, D + 1)
    new_tokens[rows, n_accepted] = next_token  # tokens past n_accepted are ignored
    # 2. h^0 for slots new_n-W..new_n-1, from the old tail (n-W..n-1) and this forward (n..n+D)
    both = torch.cat((h_tail, hidden), dim=1)  # (B, W + D + 1, d)
    index = advance[:, None] + torch.arange(W, device=n.device)  # (B, W)
    h_tail = both.gather(1, index[..., None].expand(-1, -1, both.shape[-1]))  # (B, W, d)
    # 3. draft the next D tokens from position new_n - 1
    window = (new_n[:, None] - W + torch.arange(W, device=n.device)).clamp(min=0)  # (B, W)
    last = torch.full_like(new_n, W - 1)
    drafts, draft_probs = draft(model, head, tokens, cache, h_tail, window, last, to_probs, uniforms, absorb=True)
    return new_tokens, n_accepted, new_n, drafts, draft_probs, h_tail


class MTPSpeculator:
    """Drafting and verification state for one batch of sequences.

    Slot n (per sequence) holds the newest accepted token t_n, which the main model has not seen yet; the
    main cache is valid for slots < n. MTP module k's cache slot i is computed from h^{k-1}_i and Emb(t_{i+k}),
    so it is final only once t_{i+k} is accepted: drafting from head n leaves slots i > n - k built on drafts.
    After a step that accepts a <= D drafts the head moves to n' = n + a + 1, and module k must (re)compute
    slots n - k + 1 .. n' - 1, at most a + k <= 2D of them. So every draft recomputes the W = 2D positions
    ending at n' - 1 (two for V3's D = 1), which needs the main model's h^0 there: ``h_tail`` (B, W, d).
    Window positions before 0 (prompts shorter than W) are clamped to slot 0, which recomputes it identically.
    """

    def __init__(self, model: torch.nn.Module, cache: LatentCache, tokens: torch.Tensor,
                 to_probs: Callable[[torch.Tensor], torch.Tensor] | None, generator: torch.Generator | None,
                 compiled: bool = False):
        """``to_probs`` turns logits into the sampling distribution; None is greedy (argmax, no distribution).
        ``compiled``: run each step (verification, acceptance, drafting) as one compiled graph (:mod:`.compiled`)."""
        self.model, self.cache, self.tokens = model, cache, tokens  # tokens: (B, slots) accepted + drafted ids
        self.to_probs, self.generator = to_probs, generator
        self.depth = len(model.mtp)  # D
        self.window = 2 * self.depth  # W
        self.draft_head = DraftHead(model.lm_head.weight)  # int8 where supported: the draft only
        self._step = fused_step(speculative_step) if compiled else speculative_step

    def _uniforms(self, accept: bool) -> list[torch.Tensor]:
        if self.to_probs is None:
            return []
        return draw_uniforms(self.generator, self.tokens.shape[0], self.depth, self.tokens.device, accept)

    def prefill(self, hidden: torch.Tensor, lengths: torch.Tensor) -> None:
        """Run the MTP modules over the whole (right-padded) prompt and draft the first D tokens.

        hidden: (B, P, d) main hidden states of the prompt; lengths (B,): t_n sits at slot n = lengths.
        """
        B, P, d = hidden.shape
        positions = torch.arange(P, device=hidden.device).expand(B, P)  # (B, P)
        self.drafts, self.draft_probs = draft(self.model, self.draft_head, self.tokens, self.cache, hidden, positions,
                                              lengths - 1, self.to_probs, self._uniforms(accept=False), absorb=False)
        offsets = torch.arange(self.window, device=hidden.device)  # (W,)
        window = (lengths[:, None] - self.window + offsets).clamp(min=0)  # (B, W): slots n-W..n-1
        self.h_tail = hidden.gather(1, window[..., None].expand(-1, -1, d))  # h^0 at n-W..n-1: (B, W, d)

    def step(self, n: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Verify the pending drafts, accept, draft again. Returns new tokens (B, D + 1) of which the first
        n_accepted + 1 are real, n_accepted (B,) and the new n (B,); sequences not ``active`` do not move."""
        new_tokens, n_accepted, new_n, self.drafts, self.draft_probs, self.h_tail = self._step(
            self.model, self.draft_head, self.tokens, self.cache, n, active, self.drafts, self.draft_probs,
            self.h_tail, self.to_probs, self._uniforms(accept=True))
        return new_tokens, n_accepted, new_n
