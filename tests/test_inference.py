"""Latent cache, absorbed decoding and ``generate`` (SPEC §3): exact against a full forward, token by token."""

from __future__ import annotations

import copy

import pytest
import torch

from nanoseek import DeepSeekV3, ModelConfig, generate
from nanoseek.inference import LatentCache, logits_to_probs
from nanoseek.inference import sampling
from nanoseek.inference.sampling import check_sampling, sample

VOCAB = 64


def tiny_config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2,
        q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6,
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, rope_factor=4.0, original_max_position_embeddings=16,
        max_position_embeddings=96, num_nextn_predict_layers=1, initializer_range=0.1)
    base.update(changes)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **changes) -> DeepSeekV3:
    torch.manual_seed(seed)
    model = DeepSeekV3(tiny_config(**changes)).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)  # non-zero balancing bias: routing must still agree
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine it stalls every small op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    return tiny_model()


def _random_seqs(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _naive_greedy(model, prompt, n) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


# ------------------------------------------------------------------------------------------ cache
def test_cache_holds_only_the_latent_sized_to_the_request():
    cfg = tiny_config()
    cache = LatentCache(cfg, batch_size=3, max_length=20, dtype=torch.bfloat16)
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers  # SPEC §3
    assert cache.nbytes == cache.main_nbytes == 3 * 20 * per_token * 2
    assert all(layer.kv.shape == (3, 20, 32) and layer.kv.dtype == torch.bfloat16 for layer in cache.layers)
    with_mtp = LatentCache(cfg, 3, 20, mtp=True)
    assert len(with_mtp.mtp_layers) == cfg.num_nextn_predict_layers
    assert with_mtp.nbytes == 3 * 20 * 32 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers) * 4


@torch.no_grad()
def test_cache_stores_normalized_c_kv_and_roped_k_rope(model):
    """Each slot holds [kv_a_layernorm(c_KV) ; RoPE(k^R)] of its token, at the slots given, nothing else."""
    ids = torch.tensor(_random_seqs([7]))
    cache = LatentCache.for_model(model, 1, 10)
    pos = torch.arange(7)[None]
    model.forward_cached(ids, pos, cache, absorb=False)
    x = model.layers[0].input_layernorm(model.embed_tokens(ids))
    c_kv, k_rope = model.layers[0].self_attn.latent(x, *model.rotary(pos))
    kv = cache.layers[0].kv
    torch.testing.assert_close(kv[:, :7], torch.cat((c_kv, k_rope), -1), atol=0, rtol=0)
    assert kv[:, 7:].abs().sum() == 0


@torch.no_grad()
def test_writing_past_the_cache_is_a_clear_error(model):
    """A slot past the cache's end is a ValueError naming the slot (not an IndexError from the write)."""
    cache = LatentCache.for_model(model, 1, 4)
    with pytest.raises(ValueError, match="cache slot 4 is past the cache's 4 slots"):
        model.forward_cached(torch.tensor([[1]]), torch.tensor([[4]]), cache)


@pytest.mark.parametrize("yarn", [True, False], ids=["yarn", "plain-rope"])
@torch.no_grad()
def test_absorbed_decoding_matches_full_forward_token_by_token(yarn):
    """Batch of 3 prompts of different lengths (right-padded prefill on the up-projected path), then 40
    teacher-forced tokens one at a time at per-sequence positions on the absorbed path: every step's logits
    equal those of a full forward of the whole sequence (fp32, 1e-5). Positions run past YaRN's original
    length (16)."""
    model = tiny_model(seed=1, rope_scaling_type="yarn" if yarn else None, rope_factor=4.0 if yarn else 1.0)
    lengths, steps = [3, 11, 6], 40
    seqs = _random_seqs([n + steps for n in lengths], seed=2)
    full = [model(torch.tensor([s]))[0] for s in seqs]  # (T_b, V) each: the reference
    B, P = len(seqs), max(lengths)
    cache = LatentCache.for_model(model, B, P + steps)
    ids = torch.tensor([s[:n] + [0] * (P - n) for s, n in zip(seqs, lengths)])  # right padding
    hidden = model.forward_cached(ids, torch.arange(P).expand(B, P), cache, absorb=False)
    logits = model.lm_head(hidden)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(logits[b, :n], full[b][:n], atol=1e-5, rtol=1e-5)
    pos = torch.tensor(lengths)
    for _ in range(steps - 1):
        step_ids = torch.tensor([[s[p]] for s, p in zip(seqs, pos.tolist())])  # (B, 1)
        logits = model.lm_head(model.forward_cached(step_ids, pos[:, None], cache))  # absorbed
        expected = torch.stack([full[b][p] for b, p in enumerate(pos.tolist())])
        torch.testing.assert_close(logits[:, 0], expected, atol=1e-5, rtol=1e-5)
        pos = pos + 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 2])
@torch.no_grad()
def test_absorbed_attention_in_low_precision_equals_the_fp32_math(dtype, T, monkeypatch):
    """In bf16 / fp16 on a CPU with native products in them, W_UV is applied through each head's whole
    [W_UK; W_UV] block, keeping its W_UV rows (see _attend_absorbed): the result equals the fp32 math on the same
    rounded weights and inputs within the low precision's rounding, for 1 and 2 query tokens, with a slot masked
    out."""
    monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: True)
    monkeypatch.setattr("nanoseek.devices.native_fp16", lambda device: True)
    real_bmm, weights = torch.bmm, []
    monkeypatch.setattr(torch, "bmm", lambda a, b: weights.append(tuple(b.shape)) or real_bmm(a, b))
    attn = tiny_model(seed=4).layers[1].self_attn
    attn_lp = copy.deepcopy(attn).to(dtype)
    attn.load_state_dict({k: v.float() for k, v in attn_lp.state_dict().items()})  # the same rounded weights
    g = torch.Generator().manual_seed(5)
    B, S, H = 2, 12, attn.n_heads
    q_nope = torch.randn(B, T, H, attn.qk_nope_head_dim, generator=g).to(dtype)
    q_rope = torch.randn(B, T, H, attn.qk_rope_head_dim, generator=g).to(dtype)
    kv = torch.randn(B, S, attn.kv_lora_rank + attn.qk_rope_head_dim, generator=g).to(dtype)
    mask = torch.ones(B, 1, T, S, dtype=torch.bool)
    mask[0, 0, -1, 3] = False
    expected = attn._attend_absorbed(q_nope.float(), q_rope.float(), kv.float(), mask)
    weights.clear()
    got = attn_lp._attend_absorbed(q_nope, q_rope, kv, mask)
    assert got.dtype == dtype
    assert weights[0] == (H, attn.qk_nope_head_dim + attn.v_head_dim, attn.kv_lora_rank)  # a whole block per head
    # the rounding's size: a relative error within twice the format's epsilon (measured: bf16 3.5e-3 - 6.2e-3 of
    # 1.6e-2, fp16 ~4.8e-4 of 2e-3); W_UK scaled by 0.85 gives 4.6e-2 - 8.2e-2, by 0.97 1e-2 - 1.7e-2
    error = (got.float() - expected).norm() / expected.norm()
    assert error < 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("absorb, flash", [(True, False), (False, False), (True, True)],
                         ids=["absorbed", "expanded", "absorbed-flash"])
@torch.no_grad()
def test_chunked_prefill_either_path_matches_full_forward(model, absorb, flash, monkeypatch):
    """absorbed-flash: the absorbed attention as flash attention over the latent (used past SCORES_BUDGET, forced
    here), with the causal mask inside each chunk."""
    if flash:
        from nanoseek.model import attention
        monkeypatch.setattr(attention, "SCORES_BUDGET", 0)
    seq = torch.tensor(_random_seqs([30], seed=3))
    full = model(seq)
    cache = LatentCache.for_model(model, 1, 30)
    for start, stop in ((0, 7), (7, 8), (8, 21), (21, 30)):
        pos = torch.arange(start, stop)[None]
        logits = model.lm_head(model.forward_cached(seq[:, start:stop], pos, cache, absorb=absorb))
        torch.testing.assert_close(logits, full[:, start:stop], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mtp_cached_matches_forward_train(model):
    """MTP module 1 over its own cache, in chunks, reproduces forward_train's depth-1 logits."""
    seq = torch.tensor(_random_seqs([20], seed=4))
    out = model.forward_train(seq)
    cache = LatentCache.for_model(model, 1, 20, mtp=True)
    h0 = model.forward_cached(seq, torch.arange(20)[None], cache, absorb=False)
    for start, stop in ((0, 9), (9, 10), (10, 19)):
        pos = torch.arange(start, stop)[None]
        h1 = model.mtp_forward_cached(1, h0[:, start:stop], seq[:, start + 1: stop + 1], pos, cache,
                                      absorb=start > 0)
        torch.testing.assert_close(model.lm_head(h1), out.mtp_logits[0][:, start:stop], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ sampling
def test_logits_to_probs_greedy_top_k_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    assert logits_to_probs(logits, 0.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    torch.testing.assert_close(logits_to_probs(logits, 1.0), torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    torch.testing.assert_close(logits_to_probs(logits, 1.0, top_k=2), torch.tensor([[0.0, 0.5, 0.0, 0.25]]) / 0.75)
    # nucleus: 0.5 < 0.6 so 0.25 is needed too; 0.75 >= 0.6 stops there
    torch.testing.assert_close(logits_to_probs(logits, 1.0, top_p=0.6), torch.tensor([[0.0, 0.5, 0.0, 0.25]]) / 0.75)
    torch.testing.assert_close(logits_to_probs(logits, 1.0, top_p=0.5), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    hot = logits_to_probs(logits, 0.5)  # p^2, renormalized
    torch.testing.assert_close(hot, torch.tensor([[0.01, 0.25, 0.0225, 0.0625]]) / 0.345)
    assert logits_to_probs(logits.bfloat16(), 1.0).dtype == torch.float32
    # top_k = V - 1 drops just the least likely token; top_p = 0.99 drops a tail of 0.003 (the mass ahead of it is
    # 0.997); top_p = 1 is a valid value that keeps every token
    torch.testing.assert_close(logits_to_probs(logits, 1.0, top_k=3), torch.tensor([[0.0, 0.5, 0.15, 0.25]]) / 0.9)
    tail = torch.log(torch.tensor([[0.6, 0.397, 0.003]]))
    torch.testing.assert_close(logits_to_probs(tail, 1.0, top_p=0.99), torch.tensor([[0.6, 0.397, 0.0]]) / 0.997)
    assert check_sampling(1.0, None, 1.0) == (1.0, None, 1.0)
    torch.testing.assert_close(logits_to_probs(logits, 1.0, top_p=1.0), torch.tensor([[0.1, 0.5, 0.15, 0.25]]))


def test_top_k_keeps_ties_as_transformers_does():
    """top-k keeps every token whose logit equals the k-th largest, as transformers' TopKLogitsWarper does (so a
    row of ties keeps more than k tokens); for k = 1..3 of 4 tokens, rows with and without ties."""
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0], [0.5, 0.5, 0.5, -1.0], [0.1, 2.0, -1.0, 1.0]])
    for k in (1, 2, 3):
        expected = TopKLogitsWarper(k)(None, logits.clone()).softmax(-1)
        torch.testing.assert_close(logits_to_probs(logits, 1.0, top_k=k), expected)


def _nucleus_by_sorting(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by its definition: sort everything, keep tokens until the mass ahead reaches top_p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(before >= top_p, 0.0))


@pytest.mark.parametrize("scale, levels", [(12.0, 1), (3.0, 2), (0.5, 3)])
def test_nucleus_from_the_most_likely_tokens_equals_a_full_sort(scale, levels, monkeypatch):
    """top-p looks among the 64, then the 512 most likely tokens, and sorts all 2048 only if neither holds
    the nucleus: peaked, middling and flat distributions take 1, 2 and 3 of those steps, and each gives the
    nucleus of the full sort (which tokens, and their probabilities)."""
    g = torch.Generator().manual_seed(int(scale * 10))
    probs = (torch.randn(3, 2048, generator=g) * scale).softmax(-1)
    sizes = (_nucleus_by_sorting(probs, 0.9) > 0).sum(-1)
    assert {1: sizes.max() <= 64, 2: 64 < sizes.max() <= 512, 3: sizes.max() > 512}[levels]
    calls = []
    real_topk = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda self, k, **kw: calls.append(k) or real_topk(self, k, **kw))
    got = sampling.nucleus(probs, 0.9)
    assert calls == [64, 512][:levels]
    assert torch.equal(got, _nucleus_by_sorting(probs, 0.9))


def test_nucleus_of_a_batch_with_a_peaked_and_a_flat_row():
    """In one batch, a peaked row (its nucleus among its 64 most likely tokens) and a flat one (more than 512):
    the 64 most likely tokens of the first row do not make the second row's nucleus; each row gets the nucleus
    of a full sort."""
    g = torch.Generator().manual_seed(3)
    probs = torch.cat([(torch.randn(1, 2048, generator=g) * scale).softmax(-1) for scale in (12.0, 0.5)])
    expected = _nucleus_by_sorting(probs, 0.9)
    sizes = (expected > 0).sum(-1).tolist()
    assert sizes[0] <= 64 and sizes[1] > 512
    assert torch.equal(sampling.nucleus(probs, 0.9), expected)


def test_sample_draws_from_the_distribution_and_never_a_zero_probability_token(monkeypatch):
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])  # zeros first, inside and last
    g = torch.Generator().manual_seed(0)
    n = 60_000
    draws = sample(probs.expand(n, -1), g)  # (n,)
    assert draws.shape == (n,) and draws.dtype == torch.long
    freq = torch.bincount(draws, minlength=6).double() / n
    assert freq[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)  # 5 sigma is 0.01 at p = 0.5
    # unnormalized rows are fine, one-hot rows (greedy) give their token, batch shapes are kept
    assert sample(torch.tensor([[0.0, 0.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0]]), g).tolist() == [2, 0]
    assert sample(torch.full((2, 3, 5), 0.2), g).shape == (2, 3)
    # the same generator state gives the same tokens
    a = sample(probs.expand(100, -1), torch.Generator().manual_seed(7))
    assert torch.equal(a, sample(probs.expand(100, -1), torch.Generator().manual_seed(7)))
    # with u given: the first token whose running sum exceeds u x the row's total, for unnormalized rows too
    # (2 + 2: u = 0.75 -> 3 > 2 -> token 1); u = 0 (torch.rand can return it) still skips a token of probability 0
    f64 = dict(dtype=torch.float64)
    assert sample(torch.tensor([[2.0, 2.0]]), u=torch.tensor([[0.75]], **f64)).tolist() == [1]
    assert sample(torch.tensor([[2.0, 2.0]]), u=torch.tensor([[0.49]], **f64)).tolist() == [0]
    assert sample(torch.tensor([[0.0, 0.3, 0.7]]), u=torch.zeros(1, 1, **f64)).tolist() == [1]
    # u * total rounded up to the total mass itself (u = 1): still the last token of nonzero probability
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw.get("dtype")))
    assert sample(torch.tensor([[0.25, 0.75, 0.0, 0.0]])).tolist() == [1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=True), "top_k"), (dict(top_p=True), "top_p"), (dict(temperature=True), "temperature"),  # not numbers
])
def test_invalid_sampling_parameters(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2]], 3, **kwargs)
    args = dict(temperature=0.0, top_k=None, top_p=None) | kwargs
    with pytest.raises(ValueError):
        check_sampling(**args)


@pytest.mark.parametrize("prompts, max_new, message", [
    ([], 3, "non-empty"), ([[1], []], 3, "prompt 1 is empty"), ([[1, VOCAB]], 3, "vocab_size"),
    ([[1, 2]], 0, "max_new_tokens"), ([[1] * 90], 7, "max_position_embeddings"),
])
def test_invalid_requests(model, prompts, max_new, message):
    with pytest.raises(ValueError, match=message) as info:
        generate(model, prompts, max_new)
    assert "\n" not in str(info.value)


def test_a_request_filling_the_context_exactly_runs(model):
    """prompt + max_new_tokens = max_position_embeddings (96) is allowed, plain and speculative (one more is
    refused: test_invalid_requests)."""
    for speculative in (False, True):
        result = generate(model, [[1] * 90, [2] * 40], 6, speculative=speculative)
        assert [len(t) for t in result.tokens] == [6, 6]


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([1, 2, 3], {}, r"prompt 0 is a single id \(1\), not a list"),
    ([[1, 2], "ab"], {}, "prompt 1 must be a list of token ids, got str"),
    ([[1, 2.0]], {}, "prompt 0 holds something other than integer token ids"),
    ([[1, 2]], dict(stop_tokens=5), "stop_tokens must be a collection of token ids"),
    ([[1, 2]], dict(seed=2**64), r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
])
def test_requests_of_the_wrong_kind_are_named(model, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, prompts, 3, **kwargs)


def test_tensor_and_numpy_arguments_are_taken_as_numbers(model):
    np = pytest.importorskip("numpy")
    prompts = _random_seqs([5, 3], seed=9)
    expected = generate(model, prompts, 6, temperature=0.7, top_k=20, top_p=0.9, seed=3).tokens
    got = generate(model, [torch.tensor(prompts[0]), np.array(prompts[1])], np.int64(6), temperature=np.float32(0.7),
                   top_k=np.int64(20), top_p=np.float64(0.9), seed=np.int64(3), stop_tokens=None).tokens
    assert got == expected
    assert generate(model, torch.tensor([prompts[0]]), 4).tokens == generate(model, prompts[:1], 4).tokens  # (B, T)


def test_extreme_sampling_parameters_give_the_most_likely_token():
    """A temperature so small that logits / T overflows fp32, and a top_p that rounds to 0 in fp32: both leave
    only the most likely token, where they used to give NaN probabilities and so always token 0."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [4.0, -2.0, 0.0, 1.0]])
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(logits_to_probs(logits, temperature=1e-45), one_hot)
    assert torch.equal(logits_to_probs(logits, temperature=1.0, top_p=1e-300), one_hot)
    assert torch.equal(sampling.nucleus(logits.softmax(-1), 1e-300, candidates=(2,)), logits.softmax(-1) * one_hot)


def test_a_model_with_nan_weights_is_an_error_not_token_zero():
    model = tiny_model()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="logits after the prompt are not finite"):
        generate(model, [[1, 2, 3]], 4)


# ------------------------------------------------------------------------------------------ generate
def test_greedy_generate_matches_naive_loop_batched(model):
    prompts = _random_seqs([5, 1, 12], seed=5)
    result = generate(model, prompts, 16)
    assert result.tokens == [_naive_greedy(model, p, 16) for p in prompts]
    s = result.stats
    assert s.prompt_tokens == 18 and s.new_tokens == 48 and s.decode_steps == 15
    assert s.cache_bytes == 3 * (12 + 16) * (24 + 8) * 3 * 4  # B x (longest prompt + new) x (d_c + d_R) x L x 4
    assert s.acceptance_rate is None and s.drafted == 0 and s.decode_tokens_per_s > 0
    # the rates by their definitions: the 18 prompt tokens over the prefill's time; the 48 - 3 tokens after each
    # sequence's first over the decoding time (not counting the prefill)
    assert s.prefill_tokens_per_s == pytest.approx(18 / s.prefill_s)
    assert s.decode_tokens_per_s == pytest.approx(45 / s.decode_s)


def test_stop_tokens_end_each_sequence_and_are_kept(model):
    prompts = _random_seqs([4, 7], seed=6)
    free = generate(model, prompts, 12).tokens
    stop = free[0][3]
    result = generate(model, prompts, 12, stop_tokens=[stop])
    for full, got in zip(free, result.tokens):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert got == expected
    assert result.tokens[0][-1] == stop and len(result.tokens[0]) == 4


def test_sampling_is_reproducible_with_a_seed_and_streams(model):
    prompts = _random_seqs([3, 8], seed=7)
    streamed = [[], []]

    def on_tokens(new):
        assert len(new) == 2
        for acc, toks in zip(streamed, new):
            acc.extend(toks)

    a = generate(model, prompts, 20, temperature=1.0, top_k=20, top_p=0.9, seed=123, on_tokens=on_tokens)
    b = generate(model, prompts, 20, temperature=1.0, top_k=20, top_p=0.9, seed=123)
    c = generate(model, prompts, 20, temperature=1.0, top_k=20, top_p=0.9, seed=124)
    assert a.tokens == b.tokens == streamed
    assert a.tokens != c.tokens
    assert generate(model, prompts, 8, temperature=1.5, top_k=1, seed=1).tokens == generate(model, prompts, 8).tokens


def test_generate_bf16_model():
    model = tiny_model().to(torch.bfloat16)
    result = generate(model, _random_seqs([4, 6]), 5, temperature=0.8, seed=0)
    assert [len(t) for t in result.tokens] == [5, 5]
    assert result.stats.cache_bytes == 2 * (6 + 5) * 32 * 3 * 2


# ------------------------------------------------------------------------------ sampled generate, statistically
def _softmax_nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / T) (fp64) restricted to its top-p nucleus and renormalized, written out independently of
    logits_to_probs: the most likely tokens, in order, while the mass strictly ahead of a token is below top_p."""
    probs = (logits.double() / temperature).softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    out = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    return out / out.sum()


def test_plain_sampled_generate_follows_temperature_and_top_p():
    """Plain (non-speculative) sampling end to end: N copies of one prompt in a batch, one seeded call. The first
    new token (sampled from the prefill's logits) follows softmax(logits / T) restricted to the top-p nucleus, and
    the second (sampled by the decoding step), grouped by the first, follows the same law on the prompt + first
    token's logits: chi-square at the 0.999 level and a total-variation bound, and no token outside the nucleus
    ever appears. At T = 1, or without top_p, the nucleus holds about twice as many tokens: both would fail."""
    from test_speculative import _chi2_ok, _tv

    model = tiny_model(seed=0)
    prompt = _random_seqs([5], seed=1)[0]
    T, top_p, N = 0.5, 0.5, 20000
    result = generate(model, [prompt] * N, 2, temperature=T, top_p=top_p, seed=11)
    got = torch.tensor(result.tokens)  # (N, 2)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]  # (V,)
    expected = _softmax_nucleus(logits, T, top_p)
    nucleus = expected > 0
    assert 3 <= int(nucleus.sum()) <= VOCAB // 4  # the nucleus excludes most tokens (~10 of 64 here)
    assert int(nucleus.sum()) < int((_softmax_nucleus(logits, 1.0, top_p) > 0).sum())  # and T matters
    assert bool(nucleus[got[:, 0]].all()), "a token outside the top-p nucleus was sampled first"
    assert _chi2_ok(got[:, 0], expected.float()) and _tv(got[:, 0], expected.float()) < 0.02
    # the decoding step: the second token given the first
    firsts, counts = got[:, 0].unique(return_counts=True)
    with torch.no_grad():
        second_logits = model(torch.cat((torch.tensor([prompt]).expand(len(firsts), -1), firsts[:, None]), 1))[:, -1]
    for first, count, row in zip(firsts, counts, second_logits):
        seconds = got[got[:, 0] == first, 1]
        expected = _softmax_nucleus(row, T, top_p)
        assert bool((expected[seconds] > 0).all()), "a token outside the top-p nucleus was sampled second"
        if count >= 1000:
            assert _chi2_ok(seconds, expected.float()) and _tv(seconds, expected.float()) < 0.06
