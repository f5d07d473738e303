"""FP8 mixed-precision training, emulated (DeepSeek-V3 §3.3, SPEC §6): e4m3 rounding with V3's 1 x 128 tiles and
128 x 128 blocks against hand values and the checkpoint format, the three products of a linear layer against
their formulas, the routed experts' grouped product against one linear per expert, which weights the context
quantizes, and `nanoseek train --dtype fp8`."""

import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.errors import CheckpointError
from nanoseek.fp8 import dequantize_fp8, fp8_block_size, quantize_fp8
from nanoseek.train import TrainConfig, train
from nanoseek.train import fp8_mixed
from nanoseek.train.fp8_mixed import FP8GroupedMM, FP8Linear, fp8_gemms, quantize_blocks, quantize_tiles
from nanoseek.train.metrics import of_type, read_metrics

STDLIB_JSON = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


def test_tiles_are_rounded_to_e4m3_with_one_scale_per_128_elements():
    """Hand values: a tile whose largest magnitude is 896 has scale 896 / 448 = 2, so 2.3 -> 1.15 -> 1.125 (e4m3
    keeps 3 mantissa bits) -> 2.25; the next tile's largest is 112, scale 0.25: 3.3 -> 13.2 -> 13 -> 3.25. The
    last tile is partial (200 = 128 + 72 elements)."""
    x = torch.zeros(2, 200)
    x[:, 0], x[:, 1], x[:, 128], x[:, 129] = 896.0, 2.3, -112.0, 3.3
    q = quantize_tiles(x)
    assert q[0, :2].tolist() == [896.0, 2.25] and q[0, 128:130].tolist() == [-112.0, 3.25]
    assert torch.equal(q[1], q[0]) and q.shape == x.shape
    assert torch.equal(quantize_tiles(x.T, 0), q.T)  # tiles along dim 0: 128 x 1
    # e4m3 keeps 3 mantissa bits: every value within 1/16 of its tile's scale x 2^exponent
    y = torch.randn(4, 384, generator=torch.Generator().manual_seed(0))
    assert ((quantize_tiles(y) - y).abs() <= y.abs() / 16 + 1e-6).all()


def test_weight_blocks_are_the_checkpoint_format():
    """quantize_blocks rounds each 128 x 128 block exactly as the public FP8 checkpoints store weights (SPEC §7);
    an expert stack (E, R, C) block by block per expert."""
    w = torch.randn(3, 300, 200, generator=torch.Generator().manual_seed(1))
    q = quantize_blocks(w)
    for e in range(3):
        assert torch.equal(q[e], dequantize_fp8(*quantize_fp8(w[e]), dtype=torch.float32))
    assert torch.equal(quantize_blocks(w.transpose(-2, -1)), q.transpose(-2, -1))  # square blocks


def test_the_checkpoints_block_size_is_two_positive_integers():
    """config.json's quantization_config.weight_block_size: 128 x 128 when absent, (out, in) as given; a zero or
    negative size is a one-line error, not a division by zero when the weights are read."""
    assert fp8_block_size({}) == (128, 128)
    assert fp8_block_size({"quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 48]}}) == (32, 48)
    for block in ([0, 128], [128, -1]):
        with pytest.raises(CheckpointError, match="must be two positive integers"):
            fp8_block_size({"quantization_config": {"weight_block_size": block}})


def test_a_linear_layer_runs_fprop_dgrad_and_wgrad_in_fp8():
    """V3 Figure 6: y = Q(x) Q(W)^T, dx = Q(dy) Q(W), dW = Q'(dy)^T Q'(Q(x)); Q: 1 x 128 tiles along the
    features, Q': 128 x 1 tiles along the tokens (of the cached FP8 activation Q(x)), W in 128 x 128 blocks."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 150, 200, generator=g, requires_grad=True)
    w = torch.randn(260, 200, generator=g, requires_grad=True)
    dy = torch.randn(2, 150, 260, generator=g)
    y = FP8Linear.apply(x, w)
    y.backward(dy)
    w_q, x_MK, dy_MN = quantize_blocks(w.detach()), quantize_tiles(x.detach()).reshape(300, 200), dy.reshape(300, 260)
    torch.testing.assert_close(y, F.linear(quantize_tiles(x.detach()), w_q), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, quantize_tiles(dy) @ w_q, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, quantize_tiles(dy_MN, 0).T @ quantize_tiles(x_MK, 0), rtol=0, atol=0)
    # and close to the fp32 product: FP8's error, not a different product
    assert (y - F.linear(x, w)).norm() / F.linear(x, w).norm() < 0.05


def test_grouped_experts_product_is_one_fp8_linear_per_expert():
    """The routed experts' grouped product (rows sorted by expert, one expert without rows): each expert's rows
    through FP8Linear with its own weight, the Wgrad tiles over that expert's rows only."""
    g = torch.Generator().manual_seed(3)
    counts = [140, 0, 20, 96]
    x = torch.randn(sum(counts), 64, generator=g, requires_grad=True)
    w = torch.randn(4, 64, 48, generator=g, requires_grad=True)  # (E, K, N) as torch._grouped_mm takes it
    dy = torch.randn(sum(counts), 48, generator=g)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    y = FP8GroupedMM.apply(x, w, offs)
    y.backward(dy)
    start = 0
    for e, n in enumerate(counts):
        x_e = x.detach()[start: start + n].clone().requires_grad_()
        w_e = w.detach()[e].T.clone().requires_grad_()  # (N, K)
        y_e = FP8Linear.apply(x_e, w_e)
        y_e.backward(dy[start: start + n])
        # Fprop: Q(x_e) Q(W_e)^T, the weight rounded too (not the fp32 weight)
        y_want = F.linear(quantize_tiles(x_e.detach()), quantize_blocks(w_e.detach()))
        torch.testing.assert_close(y[start: start + n], y_want, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(x.grad[start: start + n], x_e.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(w.grad[e], w_e.grad.T, rtol=1e-5, atol=1e-5)  # zero for the expert without rows
        start += n


def test_products_keep_the_activation_dtype_and_a_biased_product_stays_exact():
    """The FP8 products return y, dx in the activation's dtype (bf16 in, bf16 out), the weight gradient in the
    weight's; a linear call with a bias (none in V3's layers) is left to the plain product, bias included, not
    run as an FP8 product that drops its bias."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 200, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(64, 200, generator=g, requires_grad=True)
    y = FP8Linear.apply(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(quantize_tiles(x.detach()), quantize_blocks(w.detach())).to(torch.bfloat16),
                               rtol=0, atol=0)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    xg = torch.randn(30, 64, generator=g).to(torch.bfloat16)
    we = torch.randn(2, 64, 48, generator=g)
    assert FP8GroupedMM.apply(xg, we, torch.tensor([10, 30], dtype=torch.int32)).dtype == torch.bfloat16
    layer = torch.nn.Linear(200, 64)
    xf = torch.randn(3, 200, generator=g)
    with fp8_gemms(layer)():
        positional = F.linear(xf, layer.weight, layer.bias)
        keyword = F.linear(xf, layer.weight, bias=layer.bias)
        fp8 = F.linear(xf, layer.weight)
    want = xf @ layer.weight.detach().T + layer.bias.detach()
    torch.testing.assert_close(positional, want)
    torch.testing.assert_close(keyword, want)
    torch.testing.assert_close(fp8, quantize_tiles(xf) @ quantize_blocks(layer.weight.detach()).T, rtol=0, atol=0)


def test_the_context_quantizes_every_linear_layer_but_the_head_embedding_and_gate(monkeypatch):
    """Under fp8_gemms every attention projection, dense and shared FFN, routed expert stack and MTP eh_proj runs
    its products in FP8 (V3 §3.3.1); the output head and the MoE gate do not; the model is unchanged outside."""
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    seen = []
    for cls in (FP8Linear, FP8GroupedMM):
        real = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, _real=real: seen.append(a[1]) or _real(*a))
    names = {id(p): n for n, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    plain = model.forward_train(ids)
    with fp8_gemms(model)():
        out = model.forward_train(ids)
    used = {names.get(id(w), names.get(id(w._base))) for w in seen}
    attention = [f"self_attn.{p}.weight" for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
    ffn = [f"{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    want = {f"layers.0.{n}" for n in attention + [f"mlp.{f}" for f in ffn]}  # the dense layer
    for block in ("layers.1", "layers.2", "mtp.0.block"):  # the MoE layers, the MTP module's block
        want |= {f"{block}.{n}" for n in attention + [f"mlp.shared_experts.{f}" for f in ffn]}
        want |= {f"{block}.mlp.experts.gate_up_proj", f"{block}.mlp.experts.down_proj"}
    assert used == want | {"mtp.0.eh_proj.weight"} == set(fp8_mixed.fp8_weight_names(model))
    # FP8's rounding (a few routing choices flip with it), not a different model
    assert 0 < (out.logits - plain.logits).norm() < 0.1 * plain.logits.norm()
    torch.testing.assert_close(model.forward_train(ids).logits, plain.logits)  # nothing left behind


def test_train_with_fp8_products(tmp_path):
    """`nanoseek train --dtype fp8`: losses within FP8's error of the fp32 run's; fp8 refuses --compile and
    --activation-checkpointing (neither would keep the FP8 products)."""
    base = dict(preset="tiny", data=[STDLIB_JSON], vocab_size=300, seq_len=32, batch_size=4, steps=4, warmup_steps=1,
                eval_every=4, eval_batches=1, save_every=2, threads=1, cache_dir=str(tmp_path / "cache"),
                progress=False, report=False)
    train(TrainConfig(**base, dtype="fp32"), tmp_path / "fp32", log=lambda _: None)
    train(TrainConfig(**base, dtype="fp8"), tmp_path / "fp8", log=lambda _: None)
    loss = {d: [r["loss"] for r in of_type(read_metrics(tmp_path / d / "metrics.jsonl"), "train")]
            for d in ("fp32", "fp8")}
    assert loss["fp8"] != loss["fp32"] and loss["fp8"] == pytest.approx(loss["fp32"], rel=1e-2)
    with pytest.raises(ValueError, match="--dtype fp8 emulates FP8 products in eager mode.*--compile"):
        TrainConfig(dtype="fp8", compile=True).validate()
    with pytest.raises(ValueError, match="leave out --activation-checkpointing"):
        TrainConfig(dtype="fp8", activation_checkpointing=True).validate()


@pytest.mark.parametrize("grouped", [False, True])
def test_a_split_backward_runs_each_product_once(grouped, monkeypatch):
    """DualPipeV splits the backward: the input gradients first (stage_backward_input), the weight gradients
    later (stage_backward_weight), each running the FP8 node. Each part computes only its own products: one
    Dgrad and one Wgrad in all, as in one backward, and the same gradients."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    g = torch.Generator().manual_seed(5)
    if grouped:
        x0, w = torch.randn(40, 64, generator=g), torch.randn(3, 64, 48, generator=g)
        offs = torch.tensor([10, 10, 40], dtype=torch.int32)
        product = lambda x, w: fp8_mixed.fp8_grouped_mm(x, w, offs)  # noqa: E731
    else:
        x0, w = torch.randn(2, 20, 64, generator=g), torch.randn(48, 64, generator=g)
        product = fp8_mixed.fp8_linear
    w = torch.nn.Parameter(w)
    counts = {"dgrad": 0, "wgrad": 0}
    real_tiles = fp8_mixed.quantize_tiles

    def tiles(t, dim=-1):  # in a backward: Dgrad's dy tiled along the features, Wgrad's operands along the tokens
        if torch._C._current_graph_task_id() != -1:
            counts["wgrad" if dim == 0 else "dgrad"] += 1
        return real_tiles(t, dim)

    monkeypatch.setattr(fp8_mixed, "quantize_tiles", tiles)
    x = x0.clone().requires_grad_()  # a stage input: a leaf
    (product(x, w) ** 2).sum().backward()
    whole, dx, dw = dict(counts), x.grad, w.grad
    counts.update(dgrad=0, wgrad=0)
    w.grad = None
    x = x0.clone().requires_grad_()
    dinputs, groups = stage_backward_input([(product(x, w) ** 2).sum()], None, [x], [w])
    assert counts["wgrad"] == 0  # the input gradients' part ran no Wgrad
    stage_backward_weight([w], groups)
    assert whole == {"dgrad": 1, "wgrad": 4 if grouped else 2}  # Wgrad: two operands (per expert with rows)
    assert counts == whole
    assert torch.equal(dinputs[0], dx) and torch.equal(w.grad, dw)
