"""MTP speculative decoding (SPEC §5): the acceptance rule on hand-made distributions, statistically exact
output, greedy equality with plain decoding, and drafts equal to the MTP modules' training-path outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek import generate
from nanoseek.inference import speculative_accept
from nanoseek.inference.cache import LatentCache
from nanoseek.inference.draft_head import DraftHead, quantize_rows
from nanoseek.inference.speculative import greedy_accept, verification_logits
from nanoseek.inference import speculative as speculative_module

from test_inference import _random_seqs, one_thread, tiny_model  # noqa: F401  (one_thread: autouse fixture)


def _dist(*p) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float32)


def _rule(q_list, p_list, n, seed=0):
    """Run speculative_accept n times (batched) with fixed q_j (D, V) / p_j (D + 1, V)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.stack(q_list).expand(n, -1, -1)  # (n, D, V)
    p = torch.stack(p_list).expand(n, -1, -1)  # (n, D + 1, V)
    drafts = torch.multinomial(q.reshape(-1, q.shape[-1]), 1, generator=g).view(n, -1)
    n_acc, nxt = speculative_accept(drafts, q, p, g)
    return drafts, n_acc, nxt


def _tv(samples: torch.Tensor, probs: torch.Tensor) -> float:
    freq = torch.bincount(samples, minlength=probs.numel()).float() / samples.numel()
    return 0.5 * float((freq - probs).abs().sum())


def _chi2_ok(samples: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square against probs below its 0.999 quantile (Wilson-Hilferty approximation); cells
    expecting fewer than 5 samples are pooled into one."""
    n = samples.numel()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was emitted"
    expected = n * probs.double()
    small = expected < 5
    counts = torch.cat((counts[~small], counts[small].sum()[None]))
    expected = torch.cat((expected[~small], expected[small].sum()[None]))
    keep = expected > 0
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    k = int(keep.sum()) - 1
    z = 3.09  # 0.999
    return chi2 < k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


# ------------------------------------------------------------------------------------------ the rule
def test_rule_never_accepts_a_draft_the_target_excludes():
    q, p0, p1 = _dist(0.0, 0.0, 0.5, 0.5), _dist(0.6, 0.4, 0.0, 0.0), _dist(0.25, 0.25, 0.25, 0.25)
    drafts, n_acc, nxt = _rule([q], [p0, p1], 20000)
    assert int(n_acc.sum()) == 0
    assert _chi2_ok(nxt, p0)  # residual max(0, p - q) = p here


def test_rule_always_accepts_when_draft_equals_target_and_adds_a_bonus():
    p0 = _dist(0.1, 0.2, 0.3, 0.4)
    p1 = _dist(0.7, 0.0, 0.0, 0.3)
    drafts, n_acc, nxt = _rule([p0], [p0, p1], 20000)
    assert bool((n_acc == 1).all())
    assert _chi2_ok(drafts[:, 0], p0) and _chi2_ok(nxt, p1)  # the bonus token comes from p_D


def test_rule_sometimes_accepts_and_keeps_the_target_distribution():
    """First emitted token ~ p_0; P(accept d_1) = sum min(p_0, q_1); given d_1 accepted, the next emitted
    token (d_2 or its replacement) ~ p_1 (D = 2, context-free hand-made distributions)."""
    q1, q2 = _dist(0.5, 0.3, 0.1, 0.1, 0.0), _dist(0.05, 0.05, 0.1, 0.2, 0.6)
    p0, p1, p2 = _dist(0.2, 0.2, 0.2, 0.2, 0.2), _dist(0.4, 0.1, 0.1, 0.1, 0.3), _dist(0.0, 0.0, 0.0, 0.5, 0.5)
    n = 200_000
    drafts, n_acc, nxt = _rule([q1, q2], [p0, p1, p2], n, seed=1)
    first = torch.where(n_acc >= 1, drafts[:, 0], nxt)
    assert _chi2_ok(first, p0) and _tv(first, p0) < 0.01
    assert abs(float((n_acc >= 1).float().mean()) - float(torch.minimum(p0, q1).sum())) < 0.005  # 0.6
    ok = n_acc >= 1
    second = torch.where(n_acc[ok] >= 2, drafts[ok, 1], nxt[ok])
    assert _chi2_ok(second, p1) and _tv(second, p1) < 0.01
    assert abs(float((n_acc[ok] == 2).float().mean()) - float(torch.minimum(p1, q2).sum())) < 0.005  # 0.5
    third = nxt[n_acc == 2]  # bonus
    assert _chi2_ok(third, p2)


def test_rule_rejects_a_draft_the_target_excludes_even_at_u_zero():
    """min(1, p/q) is 0 for p(d) = 0: rejected even for a uniform number of exactly 0 (torch.rand can return it);
    the replacement is then drawn from max(0, p - q) = (0, 0, 0.5), i.e. token 2."""
    q = _dist(0.5, 0.5, 0.0)[None, None]  # (1, 1, 3)
    p = torch.stack((_dist(0.0, 0.5, 0.5), _dist(1.0, 0.0, 0.0)))[None]  # (1, 2, 3)
    n_acc, nxt = speculative_accept(torch.tensor([[0]]), q, p, u=torch.zeros(1, 1),
                                    u_next=torch.full((1, 1), 0.5, dtype=torch.float64))
    assert n_acc.tolist() == [0] and nxt.tolist() == [2]


# ------------------------------------------------------------------------------------------ generate
@pytest.mark.parametrize("depth", [1, 2])
def test_greedy_speculative_equals_greedy_plain(depth, monkeypatch):
    model = tiny_model(seed=3, num_nextn_predict_layers=depth)
    prompts = _random_seqs([1, 9, 4], seed=8)  # a 1-token prompt exercises the clamped draft window
    plain = generate(model, prompts, 30)
    spec = generate(model, prompts, 30, speculative=True)
    assert spec.tokens == plain.tokens
    monkeypatch.setattr(speculative_module, "PREFILL_CHUNK", 4)  # chunked prefill of main and MTP modules
    assert generate(model, prompts, 30, speculative=True).tokens == plain.tokens
    assert generate(model, prompts, 30).tokens == plain.tokens
    s = spec.stats
    assert s.speculative and s.drafted == depth * s.draft_steps and 0 <= s.accepted <= s.drafted
    assert s.acceptance_rate == s.accepted / s.drafted
    assert len(s.accepted_per_depth) == depth and s.accepted == sum(s.accepted_per_depth)
    assert s.cache_bytes == 3 * (9 + 30 + depth) * 32 * (3 + depth) * 4  # main + MTP layers, + D draft slots


def test_greedy_speculative_with_stop_tokens_and_streaming():
    model = tiny_model(seed=3)
    prompts = _random_seqs([5, 2], seed=9)
    plain = generate(model, prompts, 25)
    stop = plain.tokens[1][6]
    streamed = [[], []]
    spec = generate(model, prompts, 25, speculative=True, stop_tokens=[stop],
                    on_tokens=lambda new: [a.extend(t) for a, t in zip(streamed, new)])
    assert spec.tokens == generate(model, prompts, 25, stop_tokens=[stop]).tokens == streamed


def test_speculative_statistics_count_each_running_sequence_and_step(monkeypatch):
    """draft_steps / drafted / accepted and the per-depth counts and rates, counted by hand from the acceptance
    rule's results (recorded) in the steps where each sequence still runs (it emitted tokens, on_tokens). Here the
    second sequence finishes two steps before the first: its later verifications, which nothing uses, do not
    count. Each step emits the accepted drafts and one token more, except where a sequence ends."""
    model = tiny_model(seed=2, vocab_size=6, num_nextn_predict_layers=2)  # accepts drafts of both depths
    records = []
    original = speculative_module.greedy_accept

    def recording(drafts, target_logits):
        n_accepted, next_token = original(drafts, target_logits)
        records.append(n_accepted.tolist())
        return n_accepted, next_token

    monkeypatch.setattr(speculative_module, "greedy_accept", recording)
    steps = []
    s = generate(model, [[1, 4, 2, 3], [5, 0]], 16, speculative=True, on_tokens=steps.append).stats
    decoding = steps[1:]  # steps[0]: the first token of each, from the prefill
    assert len(decoding) == len(records) == s.decode_steps
    runs = [[(kept[b], n_acc[b]) for kept, n_acc in zip(decoding, records) if kept[b]] for b in range(2)]
    assert len(runs[1]) < len(runs[0]) == len(records)  # the second sequence finished early
    accepted = [a for run in runs for _, a in run]  # per (running sequence, step)
    assert s.draft_steps == len(accepted) and s.drafted == 2 * len(accepted)
    assert s.accepted == sum(accepted)
    per_depth = [sum(a > k for a in accepted) for k in range(2)]
    assert s.accepted_per_depth == per_depth and per_depth[1] > 0
    assert s.acceptance_rate == pytest.approx(sum(accepted) / (2 * len(accepted)))
    assert s.acceptance_rate_per_depth == pytest.approx([c / len(accepted) for c in per_depth])
    assert all(len(kept) == a + 1 for run in runs for kept, a in run[:-1])


def test_sampled_speculative_is_reproducible():
    model = tiny_model(seed=3, num_nextn_predict_layers=2)
    prompts = _random_seqs([3, 6], seed=10)
    a = generate(model, prompts, 20, temperature=1.0, top_p=0.95, seed=5, speculative=True)
    b = generate(model, prompts, 20, temperature=1.0, top_p=0.95, seed=5, speculative=True)
    assert a.tokens == b.tokens and [len(t) for t in a.tokens] == [20, 20]


def test_no_mtp_module_warns_and_decodes_plainly():
    model = tiny_model(seed=3, num_nextn_predict_layers=0)
    prompts = _random_seqs([4], seed=11)
    with pytest.warns(UserWarning, match="no MTP module"):
        result = generate(model, prompts, 6, speculative=True)
    assert result.tokens == generate(model, prompts, 6).tokens
    assert result.stats.acceptance_rate is None and not result.stats.speculative


@pytest.mark.parametrize("depth, chunk", [(2, None), (1, 3)])
def test_drafts_are_the_mtp_modules_predictions(monkeypatch, depth, chunk):
    """Every depth-1 draft distribution q equals softmax of forward_train's depth-1 logits at position n - 1
    of the final sequence (its inputs h^0_{n-1} and t_n are all accepted); depth 2 too when d_1 was accepted.
    With D = 1 and a prefill in chunks of 3, the last module's outputs (only at n - 1) come from the chunk that
    holds n - 1: the third for the 7-token prompt."""
    model = tiny_model(seed=4, num_nextn_predict_layers=depth)
    if chunk:
        monkeypatch.setattr(speculative_module, "PREFILL_CHUNK", chunk)
    records = []
    original = speculative_module.draft

    def recording(model, head, tokens, cache, h, positions, last, *args, **kwargs):
        drafts, probs = original(model, head, tokens, cache, h, positions, last, *args, **kwargs)
        records.append((positions[torch.arange(len(last)), last] + 1, drafts, probs))
        return drafts, probs

    monkeypatch.setattr(speculative_module, "draft", recording)
    # the draft's own int8 head is tested in test_draft_head_*; here the draft uses the model's exact head
    monkeypatch.setattr(speculative_module, "DraftHead", lambda weight: lambda h: F.linear(h, weight).float())
    prompts = _random_seqs([2, 7], seed=12)
    result = generate(model, prompts, 24, temperature=1.0, seed=0, speculative=True)
    checked = [0, 0]
    with torch.no_grad():
        for b, (prompt, new) in enumerate(zip(prompts, result.tokens)):
            seq = prompt + new
            mtp = [torch.softmax(lg[0].float(), -1) for lg in model.forward_train(torch.tensor([seq])).mtp_logits]
            for n_slots, drafts, probs in records:
                n = int(n_slots[b])
                if n + 1 >= len(seq):
                    continue
                torch.testing.assert_close(probs[b, 0], mtp[0][n - 1], atol=1e-5, rtol=1e-4)
                checked[0] += 1
                if depth == 2 and n + 2 < len(seq) and int(drafts[b, 0]) == seq[n + 1]:
                    torch.testing.assert_close(probs[b, 1], mtp[1][n - 1], atol=1e-5, rtol=1e-4)
                    checked[1] += 1
    assert checked[0] >= 20 and (checked[1] >= 1 or depth == 1)


def test_speculative_sampling_is_exact_end_to_end():
    """On a vocabulary of 6 with D = 2, the joint distribution of the first three generated tokens with
    speculation matches the main model's exact distribution (enumerated with full forwards): chi-square at
    the 0.999 level over 4000 samples, and TV of each marginal < 0.04 (about 4 standard deviations: over
    seeds 0-13 the largest was 0.030, the typical 0.013)."""
    model = tiny_model(seed=5, vocab_size=6, num_nextn_predict_layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # peaked enough for drafts to be both accepted and rejected
    prompt = [1, 4, 2]
    with torch.no_grad():  # exact joint of (x1, x2, x3): 1 + 6 + 36 full forwards
        def dist(prefix):
            return torch.softmax(model(torch.tensor([prompt + prefix]))[0, -1].double(), -1)
        joint = torch.zeros(6, 6, 6, dtype=torch.float64)
        p1 = dist([])
        for x1 in range(6):
            p2 = dist([x1])
            for x2 in range(6):
                joint[x1, x2] = p1[x1] * p2[x2] * dist([x1, x2])
    n = 4000
    result = generate(model, [prompt] * n, 3, temperature=1.0, seed=0, speculative=True)
    s = result.stats
    assert 0.2 < s.acceptance_rate < 0.8 and s.accepted_per_depth[1] > 0.1 * s.draft_steps, s
    codes = torch.tensor([36 * a + 6 * b + c for a, b, c in result.tokens])
    assert _chi2_ok(codes, joint.flatten())
    for axis in range(3):
        marginal = joint.sum(dim=tuple(i for i in range(3) if i != axis)).float()
        assert _tv(torch.tensor([t[axis] for t in result.tokens]), marginal) < 0.04


def test_greedy_accept_is_the_rule_on_one_hot_distributions():
    """At temperature 0 the rule on one-hot p and q (accept d_j iff it is p_j's argmax; then p's argmax after
    the accepted prefix) is what greedy_accept computes from the logits, for every prefix length 0..D."""
    g = torch.Generator().manual_seed(0)
    B, D, V = 64, 3, 5
    logits = torch.randn(B, D + 1, V, generator=g)
    target = logits.argmax(-1)  # (B, D + 1)
    drafts = target[:, :D].clone()
    cut = torch.randint(0, D + 1, (B,), generator=g)  # first wrong draft per row (D: all right)
    for b in range(B):
        if cut[b] < D:
            drafts[b, cut[b]] = (target[b, cut[b]] + 1) % V
    one_hot = torch.nn.functional.one_hot
    n_rule, next_rule = speculative_accept(drafts, one_hot(drafts, V).float(), one_hot(target, V).float(), g)
    n_greedy, next_greedy = greedy_accept(drafts, logits)
    assert torch.equal(n_greedy, cut) and torch.equal(n_rule, cut)
    assert torch.equal(next_greedy, next_rule) and torch.equal(next_greedy, target[torch.arange(B), cut])


def test_draft_head_int8_is_the_dequantized_head():
    """The draft head multiplies by the int8 weights: equal to bf16 activations times the dequantized weight
    (up to bf16 rounding of the result), close to the exact head, requantized when the weight changes."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 64, generator=g) * 0.05
    h = torch.randn(2, 3, 64, generator=g)
    head = DraftHead(weight)
    assert head.int8
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert (scale[:, None] * q.float() - weight).abs().max() <= scale.max() / 2 + 1e-7  # rounding error <= scale/2
    reference = h.bfloat16().float() @ (scale.bfloat16().float()[:, None] * q.float()).T  # (2, 3, 300)
    got = head(h)
    assert got.shape == (2, 3, 300) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference, atol=2e-2, rtol=1e-2)
    exact = h @ weight.T
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()
    with torch.no_grad():
        weight.neg_()  # an in-place change moves the version counter: the quantized copy is rebuilt
    torch.testing.assert_close(DraftHead(weight)(h), -got, atol=2e-2, rtol=1e-2)


def test_draft_head_of_an_inference_mode_weight():
    """A model built under torch.inference_mode has weights without a version counter: still quantized."""
    with torch.inference_mode():
        weight = torch.randn(64, 32)
        h = torch.randn(2, 32)
        head = DraftHead(weight)
        assert head.int8
        exact = h @ weight.T
        assert (head(h) - exact).abs().max() < 0.02 * exact.abs().max()


def test_draft_head_falls_back_to_the_exact_head():
    """Widths that are not a multiple of 16 (which torch's int8 kernel gets wrong) keep the model's head."""
    weight = torch.randn(50, 24)
    head = DraftHead(weight)
    h = torch.randn(4, 24)
    assert not head.int8
    torch.testing.assert_close(head(h), h @ weight.T)


def test_mtp_outputs_at_skips_only_the_unneeded_positions():
    """outputs_at: the cache is written at every position exactly as a full pass writes it, and the selected
    positions' outputs equal the full pass's."""
    model = tiny_model(seed=6)
    seq = torch.tensor(_random_seqs([12], seed=3))
    pos = torch.arange(11)[None]
    with torch.no_grad():
        caches = [LatentCache.for_model(model, 1, 16, mtp=True) for _ in range(2)]
        outs = []
        for cache, at in zip(caches, (None, torch.tensor([[2]]))):  # index 2 of this call: slot 10
            h0 = model.forward_cached(seq[:, :11], pos, cache, absorb=False)
            outs.append(model.mtp_forward_cached(1, h0[:, :8], seq[:, 1:9], pos[:, :8], cache, absorb=False))
            outs.append(model.mtp_forward_cached(1, h0[:, 8:], seq[:, 9:12], pos[:, 8:], cache, outputs_at=at))
    assert outs[3].shape == (1, 1, model.config.hidden_size)
    torch.testing.assert_close(outs[3][:, 0], outs[1][:, 2])
    torch.testing.assert_close(caches[1].mtp_layers[0].kv, caches[0].mtp_layers[0].kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verification_logits_are_the_heads(dtype):
    """However the product is laid out, the verification logits are lm_head's (same dtype, shape, values)."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(300, 64, generator=g).to(dtype)
    hidden = torch.randn(3, 2, 64, generator=g).to(dtype)
    got = verification_logits(weight, hidden)
    assert got.shape == (3, 2, 300) and got.dtype == dtype
    torch.testing.assert_close(got, F.linear(hidden, weight))


def test_greedy_speculative_bf16_model_is_as_greedy_as_plain_decoding():
    """A bf16 model: the draft reads the int8 head (bf16 activations), the verification the bf16 head. In bf16
    a 2-token verification rounds differently from a 1-token step, and both differ from a full forward, so
    near-ties may break either way: measured against a full forward over each generated sequence, the chosen
    tokens' logits are as close to the maximum with speculation as without it."""
    def worst_gap(model, prompts, tokens) -> float:  # max over positions of (max logit - chosen token's logit)
        gaps = []
        for prompt, new in zip(prompts, tokens):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1: -1].float()  # (new, V)
            gaps.append(float((logits.max(dim=1).values - logits.gather(1, torch.tensor(new)[:, None])[:, 0]).max()))
        return max(gaps)

    for seed in range(3):
        model = tiny_model(seed=seed).to(torch.bfloat16)
        assert DraftHead(model.lm_head.weight).int8
        prompts = _random_seqs([4, 9], seed=8)
        spec = generate(model, prompts, 24, speculative=True)
        plain = generate(model, prompts, 24)
        assert [len(t) for t in spec.tokens] == [24, 24] and spec.stats.drafted > 0
        assert worst_gap(model, prompts, spec.tokens) <= worst_gap(model, prompts, plain.tokens) + 0.02
