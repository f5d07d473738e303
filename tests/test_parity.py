"""Parity with Hugging Face transformers (the pinned reference) on tiny random configs.

Both directions: a transformers checkpoint loaded with ``nanoseek.hf.load_pretrained`` gives the same
logits, and a nanoseek checkpoint written with ``nanoseek.hf.save_pretrained`` loads into
``AutoModelForCausalLM`` with no missing weights and gives the same logits. fp32, 1e-4 absolute.

Routing is made non-trivial on purpose: initializer_range 0.1 spreads the router scores, and the
balancing bias ``e_score_correction_bias`` (a zero-initialized buffer) gets random nonzero values.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.hf import load_pretrained, save_pretrained  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402

ATOL = 1e-4
VOCAB, SEQ, BATCH = 64, 16, 2
ORIG_LEN = 8  # YaRN's original length is shorter than the test sequence: the scaled region matters

BASE = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
    first_k_dense_replace=1, routed_scaling_factor=2.0, initializer_range=0.1,
    max_position_embeddings=4 * ORIG_LEN,
)


def yarn(mscale=1.0, mscale_all_dim=1.0, factor=4.0, beta_fast=32, beta_slow=1, theta=10000.0, orig=ORIG_LEN):
    rope = dict(rope_type="yarn", rope_theta=theta, factor=factor, original_max_position_embeddings=orig,
                beta_fast=beta_fast, beta_slow=beta_slow)
    if mscale is not None:
        rope["mscale"] = mscale
    if mscale_all_dim is not None:
        rope["mscale_all_dim"] = mscale_all_dim
    return rope


V3_CASES = {
    # query compression, groups 4 / 2, YaRN with mscale = mscale_all_dim = 1 (DeepSeek-V3's own setting)
    "qlora-groups-yarn": dict(n_group=4, topk_group=2, rope_parameters=yarn(1.0, 1.0)),
    # YaRN as in DeepSeek-V2(-Lite): mscale = mscale_all_dim = 0.707 (softmax scale m^2 != 1)
    "qlora-groups-yarn-0.707": dict(n_group=4, topk_group=2, rope_parameters=yarn(0.707, 0.707)),
    # mscale != mscale_all_dim: cos/sin carry an attention factor m(s, 1) / m(s, 0.5) != 1
    "yarn-attention-factor": dict(n_group=2, topk_group=1, rope_parameters=yarn(1.0, 0.5)),
    # only mscale_all_dim given: mscale counts as absent, cos/sin factor m(s, 1) (transformers' yarn)
    "yarn-mscale-all-dim-only": dict(n_group=4, topk_group=2, rope_parameters=yarn(None, 0.5)),
    # other beta_fast / beta_slow: the ramp spans dims 1..7 of 8 (32 / 1 give 0..5 here; V3's d_R = 64, 4096: 10..23)
    "yarn-betas": dict(n_group=4, topk_group=2, qk_rope_head_dim=16, max_position_embeddings=256,
                       rope_parameters=yarn(1.0, 1.0, beta_fast=4, beta_slow=0.25, theta=100.0, orig=64)),
    # no query compression (q_proj), a single group, plain RoPE with a small base
    "no-qlora-one-group": dict(q_lora_rank=None, n_group=1, topk_group=1,
                               rope_parameters=dict(rope_type="default", rope_theta=500.0)),
    # every layer MoE, untied head, three layers
    "all-moe": dict(first_k_dense_replace=0, num_hidden_layers=3, n_group=4, topk_group=3,
                    tie_word_embeddings=False, rope_parameters=yarn(1.0, 1.0)),
    # tied embedding / head
    "tied": dict(n_group=4, topk_group=2, tie_word_embeddings=True, rope_parameters=yarn(1.0, 1.0)),
    # one expert per token (normalized gate = 1 * scale) and a non-default eps (the latent norms keep 1e-6)
    "top1-eps": dict(num_experts_per_tok=1, n_group=4, topk_group=2, rms_norm_eps=1e-2,
                     rope_parameters=yarn(1.0, 1.0)),
}

V2_CASES = {
    "greedy-no-qlora": dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                            routed_scaling_factor=2.5, rope_parameters=yarn(0.707, 0.707)),
    "greedy-qlora-groups-ignored": dict(topk_method="greedy", n_group=4, topk_group=2,
                                        routed_scaling_factor=16.0, rope_parameters=yarn(0.707, 0.707)),
    "group-limited-qlora": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                routed_scaling_factor=2.5, rope_parameters=yarn(0.707, 0.707)),
    "group-limited-no-qlora-all-moe": dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4,
                                           topk_group=2, first_k_dense_replace=0, n_shared_experts=1,
                                           routed_scaling_factor=1.5,
                                           rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
}


def _hf_v3(case: dict) -> DeepseekV3ForCausalLM:
    kw = {**BASE, **case}
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.e_score_correction_bias.normal_(0.0, 0.2)
    _randomize_norms(model)
    return model


def _hf_v2(case: dict) -> DeepseekV2ForCausalLM:
    kw = {**BASE, "norm_topk_prob": False, **case}
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**kw)).eval()
    _randomize_norms(model)
    return model


@torch.no_grad()
def _randomize_norms(model) -> None:
    """Every RMSNorm weight away from its initial ones (both libraries start there), so that a norm read in the
    wrong place (the attention's norm before the FFN, enorm for hnorm) changes the logits."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.normal_(1.0, 0.3)


def _ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _load_nanoseek(path, expect_mtp_warning: bool, **kwargs) -> DeepSeekV3:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_pretrained(path, **kwargs).eval()
    mtp_warnings = [w for w in caught if "no MTP weights" in str(w.message)]
    # transformers' DeepseekV3Config writes num_nextn_predict_layers = 1 but no MTP weights
    assert bool(mtp_warnings) == expect_mtp_warning, [str(w.message) for w in caught]
    return model


def _hf_from_nanoseek(path, dtype=torch.float32):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=dtype)
    return model.eval(), info


@torch.no_grad()
def _randomize_bias(model: DeepSeekV3) -> None:
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.normal_(0.0, 0.2)


# ---------------------------------------------------------------------------------------- V3
@pytest.mark.parametrize("name", list(V3_CASES))
def test_v3_transformers_to_nanoseek(name, tmp_path):
    torch.manual_seed(0)
    ref = _hf_v3(V3_CASES[name])
    ref.save_pretrained(tmp_path / "hf")
    model = _load_nanoseek(tmp_path / "hf", expect_mtp_warning=True)
    assert model.config.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert got.shape == (BATCH, SEQ, VOCAB)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_v3_bias_and_groups_matter(tmp_path):
    """The parity cases exercise routing: zeroing the bias or lifting the group limit changes the logits."""
    torch.manual_seed(0)
    ref = _hf_v3(V3_CASES["qlora-groups-yarn"])
    ref.save_pretrained(tmp_path / "hf")
    model = _load_nanoseek(tmp_path / "hf", expect_mtp_warning=True)
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
        model.layers[1].mlp.gate.e_score_correction_bias.zero_()
        no_bias = model(ids)
        model.layers[1].mlp.gate.topk_group = model.layers[1].mlp.gate.n_group
        no_groups = model(ids)
    assert (base - no_bias).abs().max() > 1e-2
    assert (no_bias - no_groups).abs().max() > 1e-2


@pytest.mark.parametrize("name", list(V3_CASES))
def test_v3_nanoseek_to_transformers(name, tmp_path):
    """nanoseek (with an MTP module) -> save_pretrained -> AutoModelForCausalLM: no missing weights, same logits;
    and back through load_pretrained with the MTP module intact."""
    torch.manual_seed(0)
    ref = _hf_v3(V3_CASES[name])
    ref.config.save_pretrained(tmp_path / "cfg")
    cfg = _load_config(tmp_path / "cfg").replace(num_nextn_predict_layers=1)
    torch.manual_seed(1)
    model = DeepSeekV3(cfg).eval()
    _randomize_bias(model)
    _randomize_norms(model)
    save_pretrained(model, tmp_path / "ns")
    hf, info = _hf_from_nanoseek(tmp_path / "ns")
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    L = cfg.num_hidden_layers
    # the only extra tensors are the MTP layer, which transformers does not run
    assert all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    ids = _ids(2)
    with torch.no_grad():
        expected = hf(ids).logits
        out = model.forward_train(ids)
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)

    back = _load_nanoseek(tmp_path / "ns", expect_mtp_warning=False)
    assert len(back.mtp) == 1
    with torch.no_grad():
        again = back.forward_train(ids)
    torch.testing.assert_close(again.logits, out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(again.mtp_logits[0], out.mtp_logits[0], atol=ATOL, rtol=0)


def _load_config(path) -> ModelConfig:
    return ModelConfig.from_hf(path)


# ---------------------------------------------------------------------------------------- V2
@pytest.mark.parametrize("name", list(V2_CASES))
def test_v2_transformers_to_nanoseek(name, tmp_path):
    torch.manual_seed(0)
    ref = _hf_v2(V2_CASES[name])
    ref.save_pretrained(tmp_path / "hf")
    model = _load_nanoseek(tmp_path / "hf", expect_mtp_warning=False)
    cfg = model.config
    assert (cfg.model_type, cfg.scoring_func, cfg.norm_topk_prob) == ("deepseek_v2", "softmax", False)
    assert cfg.topk_method == V2_CASES[name]["topk_method"]
    assert all(layer.mlp.gate.e_score_correction_bias is None for layer in model.layers if layer.is_moe)
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(V2_CASES))
def test_v2_nanoseek_to_transformers(name, tmp_path):
    torch.manual_seed(0)
    ref = _hf_v2(V2_CASES[name])
    ref.config.save_pretrained(tmp_path / "cfg")
    cfg = _load_config(tmp_path / "cfg")
    torch.manual_seed(1)
    model = DeepSeekV3(cfg).eval()
    _randomize_norms(model)
    save_pretrained(model, tmp_path / "ns")
    hf, info = _hf_from_nanoseek(tmp_path / "ns")
    assert type(hf).__name__ == "DeepseekV2ForCausalLM"
    assert hf.config.topk_method == cfg.topk_method
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_v2_group_limit_matters(tmp_path):
    torch.manual_seed(0)
    ref = _hf_v2(V2_CASES["group-limited-qlora"])
    ref.save_pretrained(tmp_path / "hf")
    model = _load_nanoseek(tmp_path / "hf", expect_mtp_warning=False)
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
        model.layers[1].mlp.gate.topk_method = "greedy"
        greedy = model(ids)
    assert (base - greedy).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------- bf16
def test_bf16_sanity(tmp_path):
    """bf16 weights on both sides (router weight and bias kept fp32): logits agree loosely."""
    torch.manual_seed(0)
    ref = _hf_v3(V3_CASES["qlora-groups-yarn"])
    ref.save_pretrained(tmp_path / "hf")
    model = _load_nanoseek(tmp_path / "hf", expect_mtp_warning=True, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    hf, _ = _hf_from_nanoseek(tmp_path / "hf", dtype=torch.bfloat16)
    ids = _ids()
    with torch.no_grad():
        fp32 = ref(ids).logits
        got = model(ids)
        expected = hf(ids).logits
    assert got.dtype == torch.bfloat16
    diff = (got.float() - expected.float()).abs()
    assert diff.mean() < 2e-2 and diff.max() < 0.25, (diff.mean(), diff.max())
    # and both stay close to the fp32 result
    assert (got.float() - fp32).abs().mean() < 3e-2
