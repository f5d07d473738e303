"""Hugging Face checkpoints: round trips, the checkpoint names, FP8 (SPEC §7), errors, transformers interop."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek import hf as hf_mod
from nanoseek.fp8 import dequantize_fp8, quantize_fp8
from nanoseek.hf import CheckpointError, load_pretrained, save_pretrained

TINY = ModelConfig.preset("tiny")
SHARD_BYTES = 64 * 1024


def make_model(config: ModelConfig = TINY, seed: int = 0) -> DeepSeekV3:
    torch.manual_seed(seed)
    model = DeepSeekV3(config).eval()
    with torch.no_grad():  # non-trivial norms and balancing biases so a dropped tensor shows
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight") or name.endswith("e_score_correction_bias"):
                t.copy_(1.0 + 0.1 * torch.randn_like(t))
    return model


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_state(a: DeepSeekV3, b: DeepSeekV3) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def expected_names(cfg: ModelConfig) -> set[str]:
    """The checkpoint names, written out from SPEC §3-5 independently of nanoseek.hf."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}

    def block(i: int) -> set[str]:
        p = f"model.layers.{i}."
        out = {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        attn = ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
        attn += ["q_proj"] if cfg.q_lora_rank is None else ["q_a_proj", "q_a_layernorm", "q_b_proj"]
        out |= {f"{p}self_attn.{n}.weight" for n in attn}
        if i < cfg.first_k_dense_replace:
            out |= {f"{p}mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
        else:
            out.add(p + "mlp.gate.weight")
            if cfg.topk_method == "noaux_tc":
                out.add(p + "mlp.gate.e_score_correction_bias")
            out |= {f"{p}mlp.shared_experts.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
            out |= {f"{p}mlp.experts.{e}.{n}.weight" for e in range(cfg.n_routed_experts)
                    for n in ("gate_proj", "up_proj", "down_proj")}
        return out

    for i in range(cfg.num_hidden_layers):
        names |= block(i)
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        i = cfg.num_hidden_layers + k - 1
        names |= block(i)
        names |= {f"model.layers.{i}.{n}.weight" for n in
                  ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens")}
    return names


@pytest.fixture(scope="module")
def tiny() -> DeepSeekV3:
    return make_model()


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {"single": save_pretrained(tiny, root / "single"),
            "sharded": save_pretrained(tiny, root / "sharded", max_shard_bytes=SHARD_BYTES)}


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_round_trip_state_and_logits(tiny, saved, layout):
    loaded = load_pretrained(saved[layout])
    assert loaded.config == tiny.config and loaded.config.num_nextn_predict_layers == 1
    assert_same_state(tiny, loaded)
    ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = tiny.forward_train(ids), loaded.forward_train(ids)
    assert torch.equal(a.logits, b.logits)
    assert len(b.mtp_logits) == 1 and torch.equal(a.mtp_logits[0], b.mtp_logits[0])
    assert all(p.requires_grad for p in loaded.parameters())


def test_save_of_a_compiled_model_writes_the_checkpoint_names(tiny, saved, tmp_path):
    """save_pretrained(torch.compile(model)) wrote every tensor as model._orig_mod.*: a checkpoint that no loader
    reads (over an existing one, too). The wrapper is now looked through; anything else is a TypeError."""
    out = save_pretrained(torch.compile(tiny), tmp_path / "compiled")  # wrapping compiles nothing yet
    with safe_open(str(out / "model.safetensors"), "pt") as f, \
            safe_open(str(saved["single"] / "model.safetensors"), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
    assert_same_state(tiny, load_pretrained(out))
    with pytest.raises(TypeError, match="save_pretrained writes a nanoseek DeepSeekV3, got Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear")
    assert not (tmp_path / "linear").exists()


def test_single_file_layout(saved):
    files = sorted(p.name for p in saved["single"].iterdir())
    assert files == ["config.json", "model.safetensors"]


def test_sharded_layout_and_index(saved):
    path = saved["sharded"]
    shards = sorted(path.glob("*.safetensors"))
    n = len(shards)
    assert n > 2
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            keys = list(f.keys())
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys]
        assert all(weight_map[k] == shard.name for k in keys)
        assert sum(sizes) <= SHARD_BYTES or len(keys) == 1  # a tensor larger than a shard goes alone
        total += sum(sizes)
    assert set(weight_map) == set(read_checkpoint(path)) == expected_names(TINY)
    assert index["metadata"]["total_size"] == total
    assert not (path / "model.safetensors").exists()


def test_saved_keys_are_the_checkpoint_names(tiny, saved):
    ckpt = read_checkpoint(saved["single"])
    assert set(ckpt) == expected_names(TINY)
    cfg, L = TINY, TINY.num_hidden_layers
    F, D = cfg.moe_intermediate_size, cfg.hidden_size
    # per-expert matrices: gate first, then up, in nanoseek's stacked (E, 2F, D) tensor
    gate_up, down = tiny.layers[1].mlp.experts.gate_up_proj, tiny.layers[1].mlp.experts.down_proj
    for e in (0, cfg.n_routed_experts - 1):
        assert ckpt[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"].shape == (F, D)
        assert torch.equal(ckpt[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"], gate_up[e, :F])
        assert torch.equal(ckpt[f"model.layers.1.mlp.experts.{e}.up_proj.weight"], gate_up[e, F:])
        assert ckpt[f"model.layers.1.mlp.experts.{e}.down_proj.weight"].shape == (D, F)
        assert torch.equal(ckpt[f"model.layers.1.mlp.experts.{e}.down_proj.weight"], down[e])
    # MTP: layer L, with copies of the embedding and the output head, shared_head.norm = the MTP output norm
    assert torch.equal(ckpt[f"model.layers.{L}.embed_tokens.weight"], tiny.embed_tokens.weight)
    assert torch.equal(ckpt[f"model.layers.{L}.shared_head.head.weight"], tiny.lm_head.weight)
    assert torch.equal(ckpt[f"model.layers.{L}.shared_head.norm.weight"], tiny.mtp[0].norm.weight)
    assert torch.equal(ckpt[f"model.layers.{L}.eh_proj.weight"], tiny.mtp[0].eh_proj.weight)
    # enorm normalizes the embedding, hnorm the hidden state (SPEC §5): the two have the same shape, so only
    # their values tell a swapped pair of names
    assert torch.equal(ckpt[f"model.layers.{L}.enorm.weight"], tiny.mtp[0].enorm.weight)
    assert torch.equal(ckpt[f"model.layers.{L}.hnorm.weight"], tiny.mtp[0].hnorm.weight)
    assert not torch.equal(tiny.mtp[0].enorm.weight, tiny.mtp[0].hnorm.weight)
    assert ckpt[f"model.layers.{L}.eh_proj.weight"].shape == (D, 2 * D)
    assert torch.equal(ckpt[f"model.layers.{L}.mlp.experts.3.down_proj.weight"],
                       tiny.mtp[0].block.mlp.experts.down_proj[3])
    assert ckpt["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    config = json.loads((saved["single"] / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == 1
    assert "quantization_config" not in config


def test_save_bf16_keeps_router_fp32(tiny, tmp_path):
    path = save_pretrained(tiny, tmp_path / "bf16", dtype=torch.bfloat16)
    ckpt = read_checkpoint(path)
    for key, t in ckpt.items():
        router = key.endswith("mlp.gate.weight") or key.endswith("e_score_correction_bias")
        assert t.dtype == (torch.float32 if router else torch.bfloat16), key
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_pretrained(path)  # the stored dtype
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(model.layers[2].mlp.experts.gate_up_proj, tiny.layers[2].mlp.experts.gate_up_proj.bfloat16())
    as32 = load_pretrained(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in as32.parameters())
    # norms stored in fp32 beside bf16 matrices (as some checkpoints do): the dtype that holds most weights wins
    ckpt = load_file(path / "model.safetensors")
    save_file({k: t.float() if "norm" in k else t for k, t in ckpt.items()}, path / "model.safetensors")
    mixed = load_pretrained(path)
    assert mixed.norm.weight.dtype == mixed.embed_tokens.weight.dtype == torch.bfloat16
    assert mixed.layers[1].mlp.gate.weight.dtype == torch.float32


def test_v2_style_and_tied_round_trip(tmp_path):
    cfg = TINY.replace(model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax", topk_method="greedy",
                       norm_topk_prob=False, n_group=1, topk_group=1, num_nextn_predict_layers=0,
                       tie_word_embeddings=True)
    model = make_model(cfg)
    path = save_pretrained(model, tmp_path / "v2")
    assert set(read_checkpoint(path)) == expected_names(cfg) - {"lm_head.weight"}
    loaded = load_pretrained(path)
    assert loaded.config == cfg
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert_same_state(model, loaded)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_save_is_atomic_and_keeps_other_files(tiny, tmp_path, monkeypatch):
    path = save_pretrained(tiny, tmp_path / "ckpt", max_shard_bytes=SHARD_BYTES)
    (path / "tokenizer.json").write_text("{}")
    save_pretrained(tiny, path)  # single file over a sharded one: stale shards and index go, the tokenizer stays
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf_mod, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny, path, max_shard_bytes=SHARD_BYTES)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind


# ---------------------------------------------------------------------------- FP8
def reference_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=torch.float32)
    for i in range(math.ceil(weight.shape[0] / block)):
        for j in range(math.ceil(weight.shape[1] / block)):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = weight[rows, cols].float() * scale_inv[i, j].float()
    return out


def test_dequantize_fp8_matches_blockwise_loop():
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(200, 300, generator=g) * 100).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 3, generator=g) + 0.01
    expected = reference_dequantize(weight, scale_inv)
    assert torch.equal(dequantize_fp8(weight, scale_inv, torch.float32), expected)
    assert torch.equal(dequantize_fp8(weight, scale_inv), expected.bfloat16())
    with pytest.raises(CheckpointError, match=r"\(2, 3\)"):
        dequantize_fp8(weight, torch.ones(2, 2))


def test_quantize_fp8_round_trip_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 300, generator=g) * torch.logspace(-3, 1, 300)  # blocks of very different ranges
    q, scale_inv = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (2, 3)
    deq = reference_dequantize(q, scale_inv)
    step = scale_inv.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300] * 2.0 ** -9  # subnormals
    assert ((deq - w).abs() <= w.abs() * 2.0 ** -4 + step).all()  # e4m3: 3 mantissa bits


FP8_CONFIG = TINY.replace(hidden_size=192, intermediate_size=320, moe_intermediate_size=160, q_lora_rank=144,
                          kv_lora_rank=144)  # several 128-blocks, none of them full
NOT_QUANTIZED = re.compile(r"(embed_tokens|lm_head|shared_head\.head|norm|mlp\.gate)\.weight$|_bias$")


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """An FP8 checkpoint as DeepSeek publishes them, from a model saved by save_pretrained: Linear weights
    float8_e4m3fn with `<name>_scale_inv`, the scales in a shard of their own, quantization_config set."""
    model = make_model(FP8_CONFIG, seed=3)
    path = save_pretrained(model, tmp_path_factory.mktemp("fp8") / "ckpt")
    ckpt = read_checkpoint(path)
    weights, scales, dequantized = {}, {}, {}
    for key, t in ckpt.items():
        if t.dim() == 2 and not NOT_QUANTIZED.search(key):
            q, s = quantize_fp8(t)
            weights[key], scales[key + "_scale_inv"] = q, s
            dequantized[key] = reference_dequantize(q, s)
        else:
            weights[key] = t
    assert any(t.shape[0] > 128 and t.shape[1] > 128 for t in dequantized.values())
    (path / "model.safetensors").unlink()
    save_file(weights, path / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(scales, path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in weights}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in scales}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config))
    # the model the FP8 checkpoint stands for: every quantized weight replaced by its dequantized value
    reference_ckpt = {**ckpt, **dequantized}
    save_file(reference_ckpt, path.parent / "reference.safetensors")
    reference_dir = path.parent / "reference"
    reference_dir.mkdir()
    (reference_dir / "config.json").write_text((path / "config.json").read_text().replace('"quantization_config"',
                                                                                        '"_unused"'))
    (path.parent / "reference.safetensors").rename(reference_dir / "model.safetensors")
    return {"path": path, "model": model, "reference": load_pretrained(reference_dir, dtype=torch.float32),
            "quantized": set(dequantized)}


def fp8_ids():
    return torch.randint(0, FP8_CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))


def test_fp8_checkpoint_loads_as_float32_exactly(fp8_checkpoint):
    loaded = load_pretrained(fp8_checkpoint["path"], dtype=torch.float32)
    assert loaded.config == FP8_CONFIG
    assert_same_state(fp8_checkpoint["reference"], loaded)
    with torch.no_grad():
        logits = loaded(fp8_ids())
        assert torch.equal(logits, fp8_checkpoint["reference"](fp8_ids()))
        original = fp8_checkpoint["model"](fp8_ids())
    # FP8 (3 mantissa bits) perturbs every matrix by ~3%: about 9% on these logits; another model is ~140% off
    assert (logits - original).norm() / original.norm() < 0.15


def test_fp8_checkpoint_loads_as_bf16_by_default(fp8_checkpoint):
    loaded = load_pretrained(fp8_checkpoint["path"])
    params = dict(loaded.named_parameters())
    assert params["layers.0.self_attn.q_a_proj.weight"].dtype == torch.bfloat16
    assert params["layers.1.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    assert params["embed_tokens.weight"].dtype == torch.bfloat16
    assert params["layers.1.mlp.gate.weight"].dtype == torch.float32
    assert loaded.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    reference = fp8_checkpoint["reference"]
    assert torch.equal(params["layers.0.self_attn.q_a_proj.weight"],
                       reference.layers[0].self_attn.q_a_proj.weight.bfloat16())
    with torch.no_grad():
        logits = loaded(fp8_ids()).float()
        original = fp8_checkpoint["model"](fp8_ids())
    assert (logits - original).norm() / original.norm() < 0.15


def test_fp8_load_then_save_is_dequantized(fp8_checkpoint, tmp_path):
    path = save_pretrained(load_pretrained(fp8_checkpoint["path"]), tmp_path / "deq")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    ckpt = read_checkpoint(path)
    assert set(ckpt) == expected_names(FP8_CONFIG)
    assert not any(t.dtype == torch.float8_e4m3fn for t in ckpt.values())


def test_fp8_weight_without_scale_is_reported(fp8_checkpoint, tmp_path):
    path = copy_checkpoint(fp8_checkpoint["path"], tmp_path / "noscale")
    scales = load_file(path / "model-00002-of-00002.safetensors")
    key = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    del scales[key]
    scales["model.layers.0.mlp.nonexistent.weight_scale_inv"] = torch.ones(1, 1)
    scales["model.norm.weight_scale_inv"] = torch.ones(1, 1)  # the scale of a weight that is not FP8
    scales["model.layers.0.self_attn.q_a_proj.weight_scale_inv"] = torch.ones(1, 1)  # (144, 192): 2 x 2 blocks
    save_file(scales, path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    # all of them in one error
    assert f"missing: {key}" in str(e.value)
    assert "2 unexpected: model.layers.0.mlp.nonexistent.weight_scale_inv, model.norm.weight_scale_inv" in str(e.value)
    assert "1 mis-shaped: model.layers.0.self_attn.q_a_proj.weight_scale_inv (1, 1) != (2, 2)" in str(e.value)


# ---------------------------------------------------------------------------- errors
def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def assert_clean(error: BaseException) -> None:
    """One line, no chained traceback from inside torch or safetensors."""
    assert "\n" not in str(error)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_missing_unexpected_and_misshaped_in_one_error(saved, tmp_path):
    path = copy_checkpoint(saved["single"], tmp_path / "bad")
    ckpt = load_file(path / "model.safetensors")
    del ckpt["model.layers.0.self_attn.kv_b_proj.weight"]
    del ckpt["model.layers.2.mlp.experts.7.up_proj.weight"]
    ckpt["model.layers.1.mlp.unknown.weight"] = torch.zeros(3)
    ckpt["model.norm.weight"] = torch.ones(65)
    ckpt["model.layers.3.embed_tokens.weight"] = torch.zeros(10, 64)  # the MTP layer's copy: never loaded, checked
    save_file(ckpt, path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    msg = str(e.value)
    assert "missing: model.layers.0.self_attn.kv_b_proj.weight, model.layers.2.mlp.experts.7.up_proj.weight" in msg
    assert "1 unexpected: model.layers.1.mlp.unknown.weight" in msg
    assert "2 mis-shaped: model.layers.3.embed_tokens.weight (10, 64) != (256, 64), model.norm.weight (65,) != (64,)" in msg
    assert e.value.missing and e.value.unexpected and e.value.mis_shaped
    assert_clean(e.value)
    assert isinstance(e.value, ValueError)
    # strict=False tolerates the unexpected tensor, not the others
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path, strict=False)
    assert "unexpected:" not in str(e.value) and "2 missing:" in str(e.value)


def test_a_tied_head_stored_anyway_is_checked_not_rejected(tmp_path):
    """tie_word_embeddings with lm_head.weight in the file as well (as some converters write it): a copy of the
    embedding loads, as in transformers; a different head contradicts config.json and is named."""
    cfg = TINY.replace(tie_word_embeddings=True, num_nextn_predict_layers=0)
    model = make_model(cfg)
    path = save_pretrained(model, tmp_path / "tied")
    ckpt = load_file(path / "model.safetensors")
    ckpt["lm_head.weight"] = ckpt["model.embed_tokens.weight"].clone()
    save_file(ckpt, path / "model.safetensors")
    loaded = load_pretrained(path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert_same_state(model, loaded)
    ckpt["lm_head.weight"][0, 0] += 1
    save_file(ckpt, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight, but "
                                              r"config\.json ties them \(tie_word_embeddings=true\)") as e:
        load_pretrained(path)
    assert_clean(e.value)


def test_unexpected_only_is_tolerated_when_not_strict(saved, tmp_path):
    path = copy_checkpoint(saved["single"], tmp_path / "extra")
    ckpt = load_file(path / "model.safetensors")
    ckpt["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, 64)  # an expert in a dense layer
    save_file(ckpt, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected: model\.layers\.0\.mlp\.experts\.0\.gate_proj"):
        load_pretrained(path)
    load_pretrained(path, strict=False)


def test_a_tensor_stored_in_two_shards_is_named(saved, tmp_path):
    """Two shards that both hold a tensor: which copy to load is unknowable, so neither is loaded silently."""
    path = copy_checkpoint(saved["sharded"], tmp_path / "twice")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    first = weight_map["model.norm.weight"]
    second = next(name for name in sorted(set(weight_map.values())) if name != first)
    tensors = load_file(path / second)
    tensors["model.norm.weight"] = torch.zeros(64)
    save_file(tensors, path / second)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    a, b = sorted([first, second])
    assert str(e.value).endswith(f"1 stored twice: model.norm.weight ({a} and {b})")
    assert_clean(e.value)


def test_a_tensor_of_integers_is_named(saved, tmp_path):
    path = copy_checkpoint(saved["single"], tmp_path / "ints")
    ckpt = load_file(path / "model.safetensors")
    ckpt["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(ckpt, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 not floating point: model\.norm\.weight I32$") as e:
        load_pretrained(path)
    assert_clean(e.value)


def test_mtp_weights_a_config_turns_off_are_skipped(saved, tiny, tmp_path):
    """A config.json with num_nextn_predict_layers = 0 over a checkpoint that holds the MTP layer (to load the main
    model alone): the MTP weights are skipped with a warning, as transformers ignores them, not rejected."""
    path = copy_checkpoint(saved["single"], tmp_path / "no-mtp")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.warns(UserWarning, match=rf"weights of layer\(s\) {TINY.num_hidden_layers} \(MTP\) are not loaded"):
        loaded = load_pretrained(path)
    assert len(loaded.mtp) == 0
    ids = torch.randint(0, TINY.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids), tiny(ids))
    with pytest.raises(ValueError, match="device meta holds no data"):
        load_pretrained(path, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_pretrained(path, device="cuda")


def test_bad_paths(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_pretrained(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    assert_clean(e.value)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(saved["single"] / "model.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json") as e:
        load_pretrained(empty)
    assert_clean(e.value)
    (empty / "config.json").write_text(json.dumps(TINY.to_hf()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(empty)


def test_malformed_config(saved, tmp_path):
    path = copy_checkpoint(saved["single"], tmp_path / "badjson")
    (path / "config.json").write_text('{"model_type": "deepseek_v3", ')
    with pytest.raises(CheckpointError, match="not valid JSON") as e:
        load_pretrained(path)
    assert_clean(e.value)
    (path / "config.json").write_text(json.dumps({**TINY.to_hf(), "n_routed_experts": 15}))
    with pytest.raises(CheckpointError, match="n_routed_experts") as e:
        load_pretrained(path)
    assert_clean(e.value)
    (path / "config.json").write_text(json.dumps({**TINY.to_hf(), "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="llama"):
        load_pretrained(path)


def test_index_naming_a_missing_shard(saved, tmp_path):
    path = copy_checkpoint(saved["sharded"], tmp_path / "noshard")
    (path / "model-00002-of-" f"{len(list(path.glob('*.safetensors'))):05d}.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shards that do not exist: model-00002-of-") as e:
        load_pretrained(path)
    assert_clean(e.value)
    (path / "model.safetensors.index.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="malformed"):
        load_pretrained(path)


def test_corrupt_shard(saved, tmp_path):
    path = copy_checkpoint(saved["single"], tmp_path / "corrupt")
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CheckpointError, match="cannot read") as e:
        load_pretrained(path)
    assert_clean(e.value)


# ---------------------------------------------------------------------------- transformers
def test_config_json_routing_and_yarn_fields_round_trip(tmp_path):
    """The routing and YaRN fields at values other than their defaults: written under transformers' names (which
    transformers reads back), and loaded again (a field dropped on either side comes back as its default)."""
    transformers = pytest.importorskip("transformers")
    cfg = TINY.replace(n_group=2, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False, scoring_func="softmax",
                       rope_theta=20000.0, rope_factor=3.0, original_max_position_embeddings=96, beta_fast=24.0,
                       beta_slow=2.0, mscale=0.9, mscale_all_dim=0.8, max_position_embeddings=288)
    path = save_pretrained(make_model(cfg), tmp_path / "ckpt")
    raw = json.loads((path / "config.json").read_text())
    assert ({k: raw[k] for k in ("n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "scoring_func")}
            == {"n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5, "norm_topk_prob": False,
                "scoring_func": "softmax"})
    yarn = {"factor": 3.0, "original_max_position_embeddings": 96, "beta_fast": 24.0, "beta_slow": 2.0, "mscale": 0.9,
            "mscale_all_dim": 0.8}
    assert raw["rope_scaling"] == {"type": "yarn", **yarn} and raw["rope_theta"] == 20000.0
    theirs = transformers.DeepseekV3Config(**raw)
    assert (theirs.n_group, theirs.topk_group, theirs.routed_scaling_factor, theirs.norm_topk_prob) == (2, 1, 1.5, False)
    assert {k: theirs.rope_parameters[k] for k in ("rope_type", "rope_theta", *yarn)} == {
        "rope_type": "yarn", "rope_theta": 20000.0, **yarn}
    assert load_pretrained(path).config == cfg
    # a top-level original_max_position_embeddings (nanoseek writes one without YaRN) yields to the yarn block's
    raw["original_max_position_embeddings"] = 32
    assert transformers.DeepseekV3Config(**raw).rope_parameters["original_max_position_embeddings"] == 96
    (path / "config.json").write_text(json.dumps(raw))
    assert ModelConfig.from_hf(path) == cfg


def test_checkpoint_written_by_transformers_loads_without_mtp(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    theirs = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**TINY.to_hf()))
    theirs.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = load_pretrained(tmp_path / "hf")
    assert ours.config.num_nextn_predict_layers == 0 and len(ours.mtp) == 0
    assert ours.config == TINY.replace(num_nextn_predict_layers=0)
    theirs_sd = theirs.state_dict()
    assert torch.equal(ours.embed_tokens.weight, theirs_sd["model.embed_tokens.weight"])
    assert torch.equal(ours.layers[2].mlp.experts.gate_up_proj, theirs_sd["model.layers.2.mlp.experts.gate_up_proj"])
    assert torch.equal(ours.layers[2].mlp.gate.weight, theirs_sd["model.layers.2.mlp.gate.weight"])


def test_transformers_loads_save_pretrained_output(saved):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = transformers.AutoModelForCausalLM.from_pretrained(saved["sharded"], output_loading_info=True)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"]
    assert not info.get("mismatched_keys")
    mtp = f"model.layers.{TINY.num_hidden_layers}."
    assert all(k.startswith(mtp) for k in info["unexpected_keys"])  # only the MTP layer is ignored


def test_transformers_checkpoint_without_shared_experts_loads(tmp_path):
    """n_shared_experts = 0: transformers still writes the shared experts' tensors, with no elements; they hold
    nothing to load, so they are not 'unexpected'."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = TINY.replace(n_shared_experts=0, num_nextn_predict_layers=0)
    theirs = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf())).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_save_through_a_link_and_not_over_the_working_directory(tmp_path, monkeypatch):
    model = make_model()
    target = save_pretrained(model, tmp_path / "checkpoints" / "step-1")
    link = tmp_path / "checkpoint"
    link.symlink_to("checkpoints/step-1")
    save_pretrained(model, link)  # writes into the directory the link names; the link stays a link
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoints"]  # nothing left beside it
    monkeypatch.chdir(target)
    with pytest.raises(CheckpointError, match="holds the current working directory"):
        save_pretrained(model, ".")
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=r"cannot write a checkpoint at .*file/sub: "):
        save_pretrained(model, tmp_path / "file" / "sub")


@pytest.mark.parametrize("ids", [torch.zeros(0, 4, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long),
                                 torch.zeros(4, dtype=torch.long), torch.zeros(1, 4)])
def test_empty_or_malformed_input_ids_are_named(ids):
    with pytest.raises(ValueError, match="input_ids must be integer token ids of shape"):
        make_model()(ids)
