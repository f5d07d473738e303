"""torch.compile paths. Compiled decoding (nanoseek.inference.compiled): the fused few-row linear against
F.linear, the compiled steps against the eager ones, and generate(compile=True) against eager generation, plain
and speculative. (Training under torch.compile: tests/test_train_loop.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanoseek import generate
from nanoseek.inference.cache import LatentCache
from nanoseek.inference.compiled import FEW_ROWS, few_row_linear, main_step, mtp_step, rewrite_few_row_linears

from test_inference import _random_seqs, one_thread, tiny_model  # noqa: F401  (one_thread: autouse fixture)


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
    """Main step (1 and 2 tokens per sequence, at different slots per sequence) and MTP step (a 2-position
    window, output at one position) against forward_cached / mtp_forward_cached; fp32 within 1e-5."""
    seqs = _random_seqs([30, 30], seed=1)
    for T in (1, 2):
        eager_cache, ids, _ = _filled_cache(model, seqs, 20)
        compiled_cache, _, _ = _filled_cache(model, seqs, 20)
        for step in range(3):
            pos = torch.tensor([[20 + step * T + t for t in range(T)], [22 + step * T + t for t in range(T)]])  # (2, T)
            step_ids = ids.gather(1, pos)
            hidden, logits = main_step(model, step_ids, pos, compiled_cache)
            want = model.forward_cached(step_ids, pos, eager_cache)
            torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits, model.lm_head(want), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled_cache.layers[0].kv, eager_cache.layers[0].kv, rtol=1e-5, atol=1e-5)
    cache, ids, h = _filled_cache(model, seqs, 20)
    window = torch.tensor([[18, 19], [19, 20]])  # (2, W)
    at = torch.tensor([[1], [0]])
    got = mtp_step(model, 1, h[:, 18:20], ids.gather(1, window + 1), window, cache, outputs_at=at)
    cache, ids, h = _filled_cache(model, seqs, 20)
    want = model.mtp_forward_cached(1, h[:, 18:20], ids.gather(1, window + 1), window, cache, outputs_at=at)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("speculative", [False, True])
def test_compiled_generation_equals_eager(model, speculative):
    """Greedy: the same tokens; sampled with a seed: the same tokens too (the steps' logits agree to ~1e-6)."""
    prompts = _random_seqs([9, 5], seed=2)
    for temperature in (0.0, 0.8):
        want = generate(model, prompts, 12, temperature=temperature, seed=5, speculative=speculative)
        got = generate(model, prompts, 12, temperature=temperature, seed=5, speculative=speculative, compile=True)
        assert got.tokens == want.tokens
        assert got.stats.accepted == want.stats.accepted
        assert got.stats.compiled and not want.stats.compiled
        assert 0 < got.stats.first_step_s < got.stats.decode_s and got.stats.decode_tokens_per_s > 0

