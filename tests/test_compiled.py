"""torch.compile paths. Compiled decoding (nanoseek.inference.compiled): the fused few-row linear against
F.linear, the compiled steps against the eager ones, and generate(compile=True) against eager generation, plain
and speculative. (Training under torch.compile: tests/test_train_loop.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanoseek import generate
from nanoseek.inference.cache import LatentCache
from nanoseek.inference.compiled import FEW_ROWS, few_row_linear, fused_step, main_step, rewrite_few_row_linears
from nanoseek.inference.draft_head import DraftHead
from nanoseek.inference.generate import plain_step
from nanoseek.inference.sampling import sampling_distribution
from nanoseek.inference.speculative import draw_uniforms, speculative_step

from test_inference import _random_seqs, one_thread, tiny_model  # noqa: F401  (one_thread: autouse fixture)

# Every compiled decoding test runs batches of 2 and samples with these parameters, so that the tests share
# their compiled steps (the step functions are compiled once per process and the request length is dynamic):
# compiling is most of these tests' time, tens of seconds per graph on a 2-core CPU.
TEMPERATURE, TOP_K, TOP_P = 0.8, 20, 0.9


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.mark.parametrize("rows", [1, 2, 3, FEW_ROWS])
def test_few_row_linear_is_linear(rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 1, 48, generator=g), torch.randn(80, 48, generator=g), torch.randn(80, generator=g)
    torch.testing.assert_close(few_row_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(few_row_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert few_row_linear(x, w).shape == (rows, 1, 80)


def test_only_linears_over_few_rows_are_rewritten():
    counts = []

    def backend(gm, example_inputs):
        counts.append(rewrite_few_row_linears(gm))
        return gm.forward

    layer = torch.nn.Linear(16, 8)
    f = torch.compile(lambda x: layer(layer(x)[..., :8].repeat(1, 2)), backend=backend, dynamic=False)
    for rows, rewritten in ((1, 2), (FEW_ROWS, 2), (FEW_ROWS + 1, 0)):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(f(x), layer(layer(x)[..., :8].repeat(1, 2)))
        assert counts[-1] == rewritten


def _filled_cache(model, seqs, prefix):
    cache = LatentCache.for_model(model, len(seqs), 40, mtp=True)
    ids = torch.tensor(seqs)
    pos = torch.arange(prefix).expand(len(seqs), prefix)
    h = model.forward_cached(ids[:, :prefix], pos, cache, absorb=False)
    model.mtp_forward_cached(1, h[:, : prefix - 1], ids[:, 1:prefix], pos[:, : prefix - 1], cache, absorb=False)
    return cache, ids, h


@torch.inference_mode()
def test_compiled_steps_equal_the_eager_steps(model):
    """Main step (benchmarks/decode.py's compiled path: 1 token per sequence, at different slots per sequence)
    against forward_cached; fp32 within 1e-5. (Two tokens per sequence: the fused speculative step below.)"""
    seqs = _random_seqs([30, 30], seed=1)
    eager_cache, ids, _ = _filled_cache(model, seqs, 20)
    compiled_cache, _, _ = _filled_cache(model, seqs, 20)
    for step in range(3):
        pos = torch.tensor([[20 + step], [22 + step]])  # (2, 1)
        step_ids = ids.gather(1, pos)
        hidden, logits = main_step(model, step_ids, pos, compiled_cache)
        want = model.forward_cached(step_ids, pos, eager_cache)
        torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, model.lm_head(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_cache.layers[0].kv, eager_cache.layers[0].kv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, TEMPERATURE])
@torch.inference_mode()
def test_fused_steps_equal_the_eager_steps(model, temperature):
    """The whole decoding steps compiled into one graph each (plain: forward, token choice, bookkeeping;
    speculative: verification, acceptance, MTP drafting) against the same functions run eagerly, from the same
    state with the same uniform draws: same tokens, slots and acceptance, and caches, drafts, draft
    distributions and hidden states within 1e-5, for 3 steps of 2 sequences at different slots."""
    to_probs = None if temperature == 0 else sampling_distribution(temperature, TOP_K, TOP_P)  # as generate() does
    seqs = _random_seqs([30, 30], seed=1)
    head = DraftHead(model.lm_head.weight)
    states = []
    for _ in range(2):  # eager, compiled: identical starting states
        cache, ids, h = _filled_cache(model, seqs, 20)
        tokens = torch.cat((ids, torch.zeros(2, 10, dtype=torch.long)), dim=1)  # (2, 40): slots of the cache
        n = torch.tensor([20, 18])
        states.append(dict(cache=cache, tokens=tokens, n=n, drafts=tokens.gather(1, n[:, None] + 1),  # d_1 at n + 1
                           draft_probs=None if to_probs is None else torch.softmax(torch.randn(
                               2, 1, model.config.vocab_size, generator=torch.Generator().manual_seed(0)), -1),
                           h_tail=h[:, 18:20].clone()))
    active = torch.tensor([True, True])
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        uniforms = draw_uniforms(g, 2, 1, "cpu") if to_probs is not None else []
        outs = []
        for state, fn in zip(states, (speculative_step, fused_step(speculative_step))):
            out = fn(model, head, state["tokens"], state["cache"], state["n"], active, state["drafts"],
                     state["draft_probs"], state["h_tail"], to_probs, uniforms)
            new_tokens, n_accepted, state["n"], state["drafts"], state["draft_probs"], state["h_tail"] = out
            outs.append(out)
        (want, got) = outs
        for a, b in zip(want[:4], got[:4]):
            assert torch.equal(a, b)
        for a, b in zip(want[4:], got[4:]):
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert torch.equal(states[0]["tokens"], states[1]["tokens"])
        for layer_a, layer_b in zip(states[0]["cache"].layers + states[0]["cache"].mtp_layers,
                                    states[1]["cache"].layers + states[1]["cache"].mtp_layers):
            torch.testing.assert_close(layer_b.kv, layer_a.kv, rtol=1e-5, atol=1e-5)
    # the plain step: one token per sequence
    n = torch.tensor([30, 27])
    for step in range(3):
        uniforms = [] if to_probs is None else [torch.rand(2, 1, dtype=torch.float64)]
        new_a, n_a = plain_step(model, states[0]["tokens"], states[0]["cache"], n, active, to_probs, uniforms)
        new_b, n_b = fused_step(plain_step)(model, states[1]["tokens"], states[1]["cache"], n, active, to_probs,
                                            uniforms)
        assert torch.equal(new_a, new_b) and torch.equal(n_a, n_b) and n_a.tolist() == (n + 1).tolist()
        assert torch.equal(states[0]["tokens"], states[1]["tokens"])
        n = n_a
    torch.testing.assert_close(states[1]["cache"].layers[0].kv, states[0]["cache"].layers[0].kv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("speculative", [False, True])
def test_compiled_generation_equals_eager(model, speculative):
    """Greedy: the same tokens; sampled with a seed: the same tokens too (the steps' logits agree to ~1e-6)."""
    prompts = _random_seqs([9, 5], seed=2)
    for temperature, top_k, top_p in ((0.0, None, None), (TEMPERATURE, TOP_K, TOP_P)):
        want = generate(model, prompts, 12, temperature=temperature, top_k=top_k, top_p=top_p, seed=5,
                        speculative=speculative)
        got = generate(model, prompts, 12, temperature=temperature, top_k=top_k, top_p=top_p, seed=5,
                       speculative=speculative, compile=True)
        assert got.tokens == want.tokens
        assert got.stats.accepted == want.stats.accepted
        assert got.stats.compiled and not want.stats.compiled
        assert 0 < got.stats.first_step_s < got.stats.decode_s and got.stats.decode_tokens_per_s > 0
        if not speculative:  # the rate leaves out the first step, which compiles: its 2 tokens and its time
            rate = (2 * 12 - 2 - 2) / (got.stats.decode_s - got.stats.first_step_s)  # 2 more came from the prefill
            assert got.stats.decode_tokens_per_s == pytest.approx(rate)



@torch.inference_mode()
def test_compiled_steps_are_reused_across_requests(model):
    """Sampled requests with the same parameters reuse the compiled steps, whatever their length: the request
    length is a dynamic size from the first call, so after the first request nothing compiles again (a new
    request's sampling function is a new object with the same parameters)."""
    from torch._dynamo.utils import counters

    def graphs(length, seed):
        for speculative in (False, True):
            generate(model, _random_seqs([length, length - 2], seed=seed), 6, temperature=TEMPERATURE, top_k=TOP_K,
                     top_p=TOP_P, seed=seed, speculative=speculative, compile=True)
        return counters["stats"]["unique_graphs"]

    after_one = graphs(7, 0)
    assert graphs(9, 1) == after_one and graphs(11, 2) == after_one and graphs(6, 3) == after_one


@torch.inference_mode()
def test_larger_batches_compile_one_graph(model):
    """Plain decoding of 5 sequences: 20 expert slots a step outnumber the tiny model's 16 experts, so the step
    computes every expert for each token (experts.every_expert_swiglu) and stays one graph with static shapes,
    compiled once. (The sorted path split it at its data-dependent sizes and compiled the pieces again as the
    sizes changed.) Greedy output equals eager output."""
    from torch._dynamo.utils import counters

    assert 5 * model.config.num_experts_per_tok > model.config.n_routed_experts
    prompts = _random_seqs([8, 6, 7, 5, 9], seed=4)
    want = generate(model, prompts, 10)
    before = counters["stats"]["unique_graphs"]
    got = generate(model, prompts, 10, compile=True)
    assert counters["stats"]["unique_graphs"] - before == 1
    assert got.tokens == want.tokens


def test_compiled_nucleus_takes_each_branch():
    """Compiled, top-p's choice between the most likely tokens and a full sort is a torch.cond inside the graph:
    peaked, middling and flat distributions each give the eager nucleus."""
    from nanoseek.inference.compiled import decoding_backend
    from nanoseek.inference.sampling import nucleus

    compiled = torch.compile(lambda p: nucleus(p, 0.9), backend=decoding_backend, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for scale in (12.0, 3.0, 0.5):  # nucleus of at most 64, 65-512, more than 512 tokens
        probs = (torch.randn(2, 2048, generator=g) * scale).softmax(-1)
        torch.testing.assert_close(compiled(probs), nucleus(probs, 0.9), atol=0, rtol=0)
