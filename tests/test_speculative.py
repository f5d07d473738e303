"""MTP speculative decoding (SPEC §5): the acceptance rule on hand-made distributions, statistically exact
output, greedy equality with plain decoding, and drafts equal to the MTP modules' training-path outputs."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek import generate
from nanoseek.inference import MTPSpeculator, speculative_accept
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


def test_drafts_are_the_mtp_modules_predictions(monkeypatch):
    """Every depth-1 draft distribution q equals softmax of forward_train's depth-1 logits at position n - 1
    of the final sequence (its inputs h^0_{n-1} and t_n are all accepted); depth 2 too when d_1 was accepted."""
    model = tiny_model(seed=4, num_nextn_predict_layers=2)
    records = []
    original = MTPSpeculator._draft

    def recording(self, h, positions, last, absorb):
        drafts, probs = original(self, h, positions, last, absorb)
        records.append((positions[self.rows, last] + 1, drafts, probs))
        return drafts, probs

    monkeypatch.setattr(MTPSpeculator, "_draft", recording)
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
                if n + 2 < len(seq) and int(drafts[b, 0]) == seq[n + 1]:
                    torch.testing.assert_close(probs[b, 1], mtp[1][n - 1], atol=1e-5, rtol=1e-4)
                    checked[1] += 1
    assert checked[0] >= 20 and checked[1] >= 1


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
