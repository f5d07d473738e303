"""ModelConfig: presets against SPEC §1, config.json both ways (and with transformers), validation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.config import PRESETS, yarn_mscale
from nanoseek.model import count_parameters
from nanoseek.model.rope import rope_attention_factor, rope_frequencies

# SPEC §1, written out field by field.
SPEC_V3 = dict(
    vocab_size=129280, hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3, intermediate_size=18432,
    num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048,
    n_group=8, topk_group=4, routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
    norm_topk_prob=True, num_nextn_predict_layers=1, rms_norm_eps=1e-6, rope_theta=10000.0,
    rope_scaling_type="yarn", rope_factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
    beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, max_position_embeddings=163840, model_type="deepseek_v3",
)
# SPEC §1 "Other presets" (and the published DeepSeek-V2 / V2-Lite config.json for what SPEC leaves out).
SPEC_V2 = dict(
    num_hidden_layers=60, hidden_size=5120, first_k_dense_replace=1, n_shared_experts=2, n_routed_experts=160,
    num_experts_per_tok=6, moe_intermediate_size=1536, n_group=8, topk_group=3, routed_scaling_factor=16.0,
    scoring_func="softmax", topk_method="group_limited_greedy", vocab_size=102400, rope_scaling_type="yarn",
    mscale=0.707, mscale_all_dim=0.707, rope_factor=40.0, original_max_position_embeddings=4096,
    num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, intermediate_size=12288, norm_topk_prob=False, max_position_embeddings=163840,
    num_nextn_predict_layers=0, model_type="deepseek_v2",
)
SPEC_V2_LITE = dict(
    num_hidden_layers=27, hidden_size=2048, num_attention_heads=16, q_lora_rank=None, first_k_dense_replace=1,
    intermediate_size=10944, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
    moe_intermediate_size=1408, n_group=1, topk_group=1, scoring_func="softmax", topk_method="greedy",
    routed_scaling_factor=1.0, rope_scaling_type="yarn", mscale=0.707, mscale_all_dim=0.707, rope_factor=40.0,
    original_max_position_embeddings=4096, vocab_size=102400, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, norm_topk_prob=False, max_position_embeddings=163840,
    num_nextn_predict_layers=0, model_type="deepseek_v2",
)

# The config.json published with deepseek-ai/DeepSeek-V3 (auto_map shortened).
PUBLISHED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}

HF_ARCH_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group",
                "topk_group", "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob",
                "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id", "tie_word_embeddings"]


def hf_kwargs(cfg: ModelConfig) -> dict:
    """Constructor arguments for transformers' config classes, in the legacy rope_scaling form."""
    kw = {k: getattr(cfg, k) for k in HF_ARCH_KEYS}
    kw["initializer_range"] = cfg.initializer_range
    kw["rope_scaling"] = {"type": "yarn", "factor": cfg.rope_factor,
                          "original_max_position_embeddings": cfg.original_max_position_embeddings,
                          "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "mscale": cfg.mscale,
                          "mscale_all_dim": cfg.mscale_all_dim}
    kw["rope_theta"] = cfg.rope_theta
    return kw


def differences(a: ModelConfig, b: ModelConfig) -> dict:
    return {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
            if f.compare and getattr(a, f.name) != getattr(b, f.name)}


# ---------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-r1"])
def test_v3_and_r1_presets_are_spec_section_1(name):
    cfg = ModelConfig.preset(name)
    assert {k: getattr(cfg, k) for k in SPEC_V3} == SPEC_V3
    assert cfg.qk_head_dim == 192
    assert yarn_mscale(40.0, 1.0) == pytest.approx(1.3689, abs=1e-4)  # SPEC §2: m = 1.3689
    assert cfg.softmax_scale == pytest.approx(0.13523, abs=1e-5)  # SPEC §2: scale = 0.13523
    assert rope_attention_factor(cfg) == 1.0


def test_v3_parameter_counts_match_spec():
    with torch.device("meta"):
        counts = count_parameters(DeepSeekV3(ModelConfig.preset("deepseek-v3")))
    assert counts["total_params"] == 671_026_404_352
    assert round(counts["mtp_params"] / 1e9, 2) == 11.61
    assert round(counts["activated_params_without_embedding"] / 1e9, 2) == 36.63
    assert round(counts["activated_params"] / 1e9, 2) == 37.55


@pytest.mark.parametrize("name, spec", [("deepseek-v2", SPEC_V2), ("deepseek-v2-lite", SPEC_V2_LITE)])
def test_v2_presets(name, spec):
    cfg = ModelConfig.preset(name)
    assert {k: getattr(cfg, k) for k in spec} == spec
    assert cfg.to_hf()["q_lora_rank"] == spec["q_lora_rank"]


def test_unknown_preset():
    with pytest.raises(ValueError, match="deepseek-v9"):
        ModelConfig.preset("deepseek-v9")


# ---------------------------------------------------------------------------- config.json
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_from_hf_round_trip(name):
    cfg = ModelConfig.preset(name)
    d = json.loads(json.dumps(cfg.to_hf()))  # through JSON, as on disk
    assert ModelConfig.from_hf(d) == cfg
    assert d["model_type"] == cfg.model_type


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "tiny"])
def test_legacy_rope_scaling_and_rope_parameters_forms(name):
    cfg = ModelConfig.preset(name)
    d = cfg.to_hf()
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"}
    assert legacy["rope_scaling"]["type"] == "yarn" and "rope_type" not in legacy["rope_scaling"]
    newer = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")}
    assert newer["rope_parameters"]["rope_type"] == "yarn" and "type" not in newer["rope_parameters"]
    assert newer["rope_parameters"]["rope_theta"] == cfg.rope_theta
    assert ModelConfig.from_hf(legacy) == cfg
    assert ModelConfig.from_hf(newer) == cfg
    theta = {**newer, "rope_parameters": {**newer["rope_parameters"], "rope_theta": 50000.0}}
    assert ModelConfig.from_hf(theta).rope_theta == 50000.0


def test_no_rope_scaling():
    cfg = ModelConfig.preset("demo")
    assert not cfg.yarn
    d = cfg.to_hf()
    assert d["rope_scaling"] is None and d["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    parsed = ModelConfig.from_hf({k: v for k, v in d.items() if k != "rope_parameters"})
    assert not parsed.yarn and parsed.rope_factor == 1.0


def test_published_v3_config_json():
    cfg = ModelConfig.from_hf(PUBLISHED_V3)  # carries quantization_config (FP8 weights, SPEC §7)
    assert differences(cfg, ModelConfig.preset("deepseek-v3")) == {"initializer_range": (0.02, 0.006)}
    assert cfg.extra == {}
    assert "quantization_config" not in cfg.to_hf()
    with_extra = ModelConfig.from_hf({**PUBLISHED_V3, "my_note": "kept"})
    assert with_extra.to_hf()["my_note"] == "kept"
    assert "quantization_config" not in ModelConfig(extra={"quantization_config": {"quant_method": "fp8"}}).to_hf()


def test_transformers_deepseek_v3_config_reads(tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = ModelConfig.preset("deepseek-v3")
    legacy = transformers.DeepseekV3Config(**hf_kwargs(spec), num_nextn_predict_layers=1)
    assert ModelConfig.from_hf(legacy.to_dict()) == spec
    kw = hf_kwargs(spec)
    rope = {"rope_type": "yarn", "rope_theta": kw.pop("rope_theta"),
            **{k: v for k, v in kw.pop("rope_scaling").items() if k != "type"}}
    newer = transformers.DeepseekV3Config(**kw, rope_parameters=rope, num_nextn_predict_layers=1)
    assert ModelConfig.from_hf(newer.to_dict()) == spec
    newer.save_pretrained(tmp_path)
    assert ModelConfig.from_hf(tmp_path) == spec
    assert ModelConfig.from_hf(tmp_path / "config.json") == spec


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v2-lite"])
def test_transformers_deepseek_v2_config_reads(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = ModelConfig.preset(name)
    theirs = transformers.DeepseekV2Config(**hf_kwargs(spec), topk_method=spec.topk_method)
    assert ModelConfig.from_hf(theirs.to_dict()) == spec  # DeepseekV2Config has no scoring_func: softmax
    theirs.save_pretrained(tmp_path)
    assert ModelConfig.from_hf(tmp_path) == spec


ROPE_CASES = {
    "v3": {},
    "v2": dict(mscale=0.707, mscale_all_dim=0.707),
    "no_mscale": dict(mscale=None),  # transformers: plain 0.1 ln(s) + 1 on cos/sin
    "no_mscale_all_dim": dict(mscale_all_dim=None),
}


def test_yarn_factor_defaults_to_the_length_ratio():
    d = ModelConfig.preset("deepseek-v3").to_hf()
    rope = {k: v for k, v in d["rope_scaling"].items() if k != "factor"}
    assert ModelConfig.from_hf({**d, "rope_scaling": rope}).rope_factor == 163840 / 4096


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_matches_transformers(case):
    """to_hf() is readable by transformers with the same rope parameters, and a rope dict in either form
    means the same frequencies, cos/sin factor and softmax scale to nanoseek as to transformers."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale

    base = ModelConfig.preset("deepseek-v3").to_hf()
    rope = {**base["rope_parameters"], **ROPE_CASES[case]}
    rope = {k: v for k, v in rope.items() if v is not None}
    d = {**base, "rope_parameters": rope, "rope_scaling": None}
    ours = ModelConfig.from_hf(d)
    for source in (d, ours.to_hf()):
        theirs = transformers.DeepseekV3Config(**source)
        if source is not d:  # our own output carries the same parameters
            for key in ("rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
                        "beta_slow"):
                assert theirs.rope_parameters[key] == pytest.approx(ours.to_hf()["rope_parameters"][key]), key
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](theirs)
        torch.testing.assert_close(rope_frequencies(ours), inv_freq, rtol=1e-6, atol=0)
        assert rope_attention_factor(ours) == pytest.approx(attention_factor, rel=1e-12)
        scale = yarn_apply_mscale(theirs.rope_parameters, theirs.qk_head_dim ** -0.5)
        assert ours.softmax_scale == pytest.approx(scale, rel=1e-12)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_absent_keys_take_transformers_defaults(model_type):
    """A config.json may omit keys: each gets the default of transformers' config class, as transformers loads
    it (an explicit null is different: V2-Lite writes n_group: null, meaning no groups)."""
    transformers = pytest.importorskip("transformers")
    theirs = {"deepseek_v3": transformers.DeepseekV3Config, "deepseek_v2": transformers.DeepseekV2Config}[model_type]()
    spec = ModelConfig.preset("tiny" if model_type == "deepseek_v3" else "deepseek-v2-lite")
    d = spec.to_hf()
    for key in ("n_group", "topk_group", "n_shared_experts", "first_k_dense_replace", "n_routed_experts"):
        default = getattr(theirs, key)
        if default is None:  # DeepseekV2Config leaves the groups unset: no groups
            continue
        partial = {k: v for k, v in d.items() if k != key}
        if key in ("n_group", "topk_group"):
            partial = {k: v for k, v in partial.items() if k not in ("n_group", "topk_group")}
        if key == "n_routed_experts":
            partial["n_group"], partial["topk_group"] = 1, 1
        assert getattr(ModelConfig.from_hf(partial), key) == default, key
    assert ModelConfig.from_hf({**d, "n_group": None, "topk_group": None}).n_group == 1


def test_yarn_without_its_original_length_reads_the_top_level_one():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = ModelConfig.preset("deepseek-v3").to_hf()
    rope = {k: v for k, v in d["rope_parameters"].items() if k != "original_max_position_embeddings"}
    d = {**d, "rope_scaling": None, "rope_parameters": rope, "original_max_position_embeddings": 4096}
    ours = ModelConfig.from_hf(d)
    assert ours.original_max_position_embeddings == 4096
    inv_freq, _ = ROPE_INIT_FUNCTIONS["yarn"](transformers.DeepseekV3Config(**d))
    torch.testing.assert_close(rope_frequencies(ours), inv_freq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("option, message", [(dict(truncate=False), "truncate=False is not supported"),
                                             (dict(attention_factor=1.5), "attention_factor=1.5 is not supported")])
def test_yarn_options_deepseek_never_sets_are_refused(option, message):
    d = ModelConfig.preset("deepseek-v3").to_hf()
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**d, "rope_scaling": None, "rope_parameters": {**d["rope_parameters"], **option}})


def test_to_hf_readable_by_transformers_v3():
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.preset("deepseek-v3")
    theirs = transformers.DeepseekV3Config(**cfg.to_hf())
    for key in HF_ARCH_KEYS:
        assert getattr(theirs, key) == getattr(cfg, key), key
    assert theirs.num_nextn_predict_layers == 1
    assert theirs.rope_parameters == {"rope_type": "yarn", "type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                      "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


# ---------------------------------------------------------------------------- validation
V3 = ModelConfig.preset("deepseek-v3")


@pytest.mark.parametrize("changes, field", [
    (dict(n_routed_experts=250), "n_routed_experts"),  # not divisible by n_group = 8
    (dict(n_group=0), "n_group"),
    (dict(topk_group=9), "topk_group"),  # > n_group
    (dict(topk_group=0), "topk_group"),
    (dict(num_experts_per_tok=129), "num_experts_per_tok"),  # 4 groups of 32 experts reachable: 128
    (dict(topk_group=1, num_experts_per_tok=33), "num_experts_per_tok"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(num_experts_per_tok=None), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(scoring_func="tanh"), "scoring_func"),
    (dict(topk_method="best"), "topk_method"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(qk_nope_head_dim=-128), "qk_nope_head_dim"),
    (dict(v_head_dim=0), "v_head_dim"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(intermediate_size=0), "intermediate_size"),  # dense layers need a width
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(n_routed_experts=0), "n_routed_experts"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(hidden_size=7168.0), "hidden_size"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rope_theta=1.0), "rope_theta"),
    (dict(rope_factor=0.5), "rope_factor"),
    (dict(beta_fast=1.0, beta_slow=32.0), "beta_fast"),
    (dict(rope_scaling_type="linear"), "rope_scaling_type"),
    (dict(routed_scaling_factor="2.5"), "routed_scaling_factor"),
    (dict(model_type="llama"), "model_type"),
])
def test_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        V3.replace(**changes)
    if all(k in V3.to_hf() for k in changes):  # the same through config.json
        with pytest.raises(ValueError, match=rf"\b{field}\b"):
            ModelConfig.from_hf({**V3.to_hf(), **changes})


def test_greedy_reaches_every_expert():
    cfg = ModelConfig.preset("deepseek-v2-lite").replace(num_experts_per_tok=64)
    assert cfg.num_experts_per_tok == 64
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        cfg.replace(num_experts_per_tok=65)


def test_unsupported_hf_features():
    d = V3.to_hf()
    for changes, word in [({"model_type": "llama"}, "llama"), ({"attention_bias": True}, "attention_bias"),
                          ({"mlp_bias": True}, "mlp_bias"), ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"moe_layer_freq": 2}, "moe_layer_freq"), ({"rope_interleave": False}, "rope_interleave"),
                          ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
                          ({"rope_scaling": None, "rope_parameters": {"rope_type": "longrope"}}, "longrope"),
                          ({"rope_scaling": {"type": "yarn", "factor": "x"}}, "yarn")]:
        with pytest.raises(ValueError, match=word):
            ModelConfig.from_hf({**d, **changes})


def test_hf_aliases_and_nulls():
    d = {k: v for k, v in V3.to_hf().items() if k != "num_nextn_predict_layers"}
    assert ModelConfig.from_hf({**d, "num_mtp_layers": 2}).num_nextn_predict_layers == 2
    assert ModelConfig.from_hf(d).num_nextn_predict_layers == 0  # absent: no MTP
    lite = ModelConfig.preset("deepseek-v2-lite").to_hf()
    parsed = ModelConfig.from_hf({**lite, "n_group": None, "topk_group": None, "q_lora_rank": None})
    assert parsed == ModelConfig.preset("deepseek-v2-lite")


def test_several_eos_ids_and_pad_id_survive_a_round_trip():
    lite = ModelConfig.preset("deepseek-v2-lite").to_hf()
    parsed = ModelConfig.from_hf({**lite, "eos_token_id": [100001, 100002], "pad_token_id": 100001})
    assert parsed.eos_token_id == (100001, 100002)
    again = ModelConfig.from_hf(json.loads(json.dumps(parsed.to_hf())))
    assert again.to_hf()["eos_token_id"] == [100001, 100002] and again.to_hf()["pad_token_id"] == 100001
    assert again == parsed
    assert ModelConfig.from_hf({**lite, "eos_token_id": []}).eos_token_id is None
    for key, bad in (("eos_token_id", "x"), ("eos_token_id", [1, -2]), ("bos_token_id", [1]), ("bos_token_id", 1.5)):
        with pytest.raises(ValueError, match=key):
            ModelConfig.from_hf({**lite, key: bad})


# ---------------------------------------------------------------------------- files
def test_from_hf_directory_and_file(tmp_path):
    cfg = ModelConfig.preset("tiny")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    assert ModelConfig.from_hf(tmp_path) == cfg
    assert ModelConfig.from_hf(str(tmp_path)) == cfg
    assert ModelConfig.from_hf(tmp_path / "config.json") == cfg
    other = tmp_path / "other.json"
    other.write_text(json.dumps(cfg.to_hf()))
    assert ModelConfig.from_hf(other) == cfg


def test_from_hf_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.json")):
        ModelConfig.from_hf(tmp_path / "nope.json")


def test_from_hf_of_something_else_names_the_argument():
    """A transformers config object (or a number) failed inside pathlib ('expected str, bytes or os.PathLike')."""
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.preset("tiny")
    theirs = transformers.DeepseekV3Config(**cfg.to_hf())
    with pytest.raises(TypeError, match=r"from_hf takes a config.json dict, file or directory, got "
                                        r"DeepseekV3Config: pass its .to_dict\(\)"):
        ModelConfig.from_hf(theirs)
    assert ModelConfig.from_hf(theirs.to_dict()) == cfg
    with pytest.raises(TypeError, match="got int$"):
        ModelConfig.from_hf(3)


def test_from_hf_invalid_json(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        ModelConfig.from_hf(bad)


def test_softmax_scale_without_yarn():
    cfg = ModelConfig.preset("demo")
    assert cfg.softmax_scale == pytest.approx(1 / math.sqrt(cfg.qk_head_dim))
