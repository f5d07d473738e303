"""`nanoseek convert`: an FP8 block-quantized checkpoint (SPEC §7) built here from a tiny model, several shards,
to bf16 shard by shard; the result loads with load_pretrained and equals the FP8 checkpoint dequantized."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek.convert as conv
from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.cli import main
from nanoseek.convert import convert_fp8_checkpoint
from nanoseek.fp8 import dequantize_fp8, quantize_fp8
from nanoseek.hf import CheckpointError, load_pretrained, save_pretrained

OTHER_FILES = {"tokenizer.json": '{"fake": "tokenizer"}', "tokenizer_config.json": '{"bos_token": "<s>"}',
               "generation_config.json": '{"temperature": 0.6}'}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to other processes' load on a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kept_bf16(key: str) -> bool:
    """What the public checkpoints keep unquantized: embeddings, output heads, norms, router gates."""
    return ("embed_tokens" in key or "head" in key or "norm" in key or key.endswith("mlp.gate.weight")
            or "e_score_correction_bias" in key)


def make_fp8_checkpoint(root: Path, block=None, single_file=False) -> Path:
    """A tiny V3 whose Linear weights are stored as float8_e4m3fn + weight_scale_inv (dims past one 128 block)."""
    config = ModelConfig.preset("tiny").replace(hidden_size=160, intermediate_size=272, q_lora_rank=136)
    torch.manual_seed(0)
    model = DeepSeekV3(config)
    save_pretrained(model, root, max_shard_bytes=1 << 60 if single_file else 200_000, dtype=torch.bfloat16)
    index_file = root / "model.safetensors.index.json"
    shards = sorted(root.glob("*.safetensors"))
    weight_map = {}
    moved_scale = None
    for i, shard in enumerate(shards):
        tensors = load_file(shard)
        out = {}
        for key, t in tensors.items():
            if t.dim() == 2 and not _kept_bf16(key):
                q, s = quantize_fp8(t.float(), block or 128)
                out[key], out[key + "_scale_inv"] = q, s
            else:
                out[key] = t
        if i == 1 and moved_scale is None:  # one scale lives in another shard than its weight
            moved_scale = next(k for k in out if k.endswith("_scale_inv"))
            first = load_file(shards[0])
            first[moved_scale] = out.pop(moved_scale)
            save_file(first, shards[0], metadata={"format": "pt"})
            weight_map[moved_scale] = shards[0].name
        save_file(out, shard, metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in out})
    if not single_file:
        assert len(shards) >= 3
        index_file.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    cfg = json.loads((root / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block or [128, 128])}
    (root / "config.json").write_text(json.dumps(cfg))
    for name, text in OTHER_FILES.items():
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    return make_fp8_checkpoint(tmp_path_factory.mktemp("fp8") / "v3-fp8")


def _state(model):
    return dict(model.state_dict())


def test_convert_matches_dequantized_reference(fp8_ckpt, tmp_path, monkeypatch):
    saved = []
    real_save = conv.save_file
    monkeypatch.setattr(conv, "save_file", lambda t, f, metadata=None: (saved.append((Path(f).name, set(t))),
                                                                        real_save(t, f, metadata=metadata)))
    dst = tmp_path / "v3-bf16"
    report = convert_fp8_checkpoint(fp8_ckpt, dst, progress=False)

    src_index = json.loads((fp8_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    scales = [k for k in src_index if k.endswith("_scale_inv")]
    assert scales and report.dequantized == len(scales) and report.shards == len(set(src_index.values()))
    assert index["weight_map"] == {k: v for k, v in src_index.items() if not k.endswith("_scale_inv")}
    # one shard at a time, under its own name, holding exactly that shard's tensors
    for name, keys in saved:
        assert keys == {k for k, v in index["weight_map"].items() if v == name}
    sizes = 0
    for name in set(index["weight_map"].values()):
        with safe_open(dst / name, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                sizes += t.numel() * t.element_size()
                assert t.dtype != torch.float8_e4m3fn
                if key in [s[: -len("_scale_inv")] for s in scales]:
                    assert t.dtype == torch.bfloat16
    assert index["metadata"]["total_size"] == sizes == report.total_bytes

    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    for name, text in OTHER_FILES.items():
        assert (dst / name).read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["v3-bf16"]  # no temporary directory left

    converted = _state(load_pretrained(dst))  # strict: no stray scale keys
    reference = _state(load_pretrained(fp8_ckpt, dtype=torch.bfloat16))  # dequantized while loading
    assert converted.keys() == reference.keys()
    for k in reference:
        assert converted[k].dtype == reference[k].dtype and torch.equal(converted[k], reference[k]), k


def test_dequantization_by_hand(fp8_ckpt, tmp_path):
    dst = convert_fp8_checkpoint(fp8_ckpt, tmp_path / "out", dtype=torch.float32, progress=False).path
    weight_map = json.loads((fp8_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.mlp.down_proj.weight"  # (160, 272): 2 x 3 blocks, the last ones partial
    with safe_open(fp8_ckpt / weight_map[key], framework="pt") as f:
        q = f.get_tensor(key)
    with safe_open(fp8_ckpt / weight_map[key + "_scale_inv"], framework="pt") as f:
        s = f.get_tensor(key + "_scale_inv")
    assert q.dtype == torch.float8_e4m3fn and s.shape == (math.ceil(160 / 128), math.ceil(272 / 128))
    blocks = q.float().clone()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blocks[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= s[i, j]
    with safe_open(dst / weight_map[key], framework="pt") as f:
        got = f.get_tensor(key)
    assert got.dtype == torch.float32 and torch.equal(got, blocks)
    config = json.loads((dst / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32"  # transformers 5 reads "dtype" first


def test_e5m2_weight_and_non_square_blocks_by_hand(tmp_path):
    """A float8_e5m2 weight is dequantized too, here with 32 x 48 blocks over a 70 x 100 matrix: partial blocks at
    both edges, and the rows and columns of a block told apart."""
    src, g = tmp_path / "src", torch.Generator().manual_seed(0)
    src.mkdir()
    q = (torch.randn(70, 100, generator=g) * 8).to(torch.float8_e5m2)
    s = torch.rand(3, 3, generator=g) + 0.5  # ceil(70 / 32) x ceil(100 / 48)
    save_file({"w": q, "w_scale_inv": s, "b": torch.ones(4)}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                         "weight_block_size": [32, 48]}}))
    convert_fp8_checkpoint(src, tmp_path / "dst", dtype=torch.float32, progress=False)
    expected = q.float().clone()
    for i in range(3):
        for j in range(3):
            expected[i * 32:(i + 1) * 32, j * 48:(j + 1) * 48] *= s[i, j]
    out = load_file(tmp_path / "dst" / "model.safetensors")
    assert out.keys() == {"w", "b"} and torch.equal(out["w"], expected) and torch.equal(out["b"], torch.ones(4))


@pytest.mark.parametrize("block, single_file", [([32, 48], False), (None, True)])
def test_other_block_sizes_and_single_file(tmp_path, block, single_file):
    src = make_fp8_checkpoint(tmp_path / "src", block=block, single_file=single_file)
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst), "--no-progress"]) == 0
    assert (dst / "model.safetensors.index.json").exists() != single_file
    converted = _state(load_pretrained(dst))
    reference = _state(load_pretrained(src, dtype=torch.bfloat16))
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    w = load_file(sorted(src.glob("*.safetensors"))[0])
    key = next(k for k in w if k.endswith(".weight") and k + "_scale_inv" in w)
    out = load_file(dst / sorted(src.glob("*.safetensors"))[0].name)
    assert torch.equal(out[key], dequantize_fp8(w[key], w[key + "_scale_inv"], block=block or 128))


def test_convert_cli_progress_and_summary(fp8_ckpt, tmp_path, capsys):
    assert main(["convert", str(fp8_ckpt), str(tmp_path / "out"), "--dtype", "fp16"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("nanoseek convert: ") and "dequantized to fp16" in out and out.count("\n") == 1
    assert "convert: 100%" in err  # tqdm over shards
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    assert load_pretrained(tmp_path / "out").layers[0].mlp.down_proj.weight.dtype == torch.float16


def _bad(tmp_path, fp8_ckpt, case):
    if case == "missing":
        return tmp_path / "nope"
    if case == "not-fp8":
        return save_pretrained(DeepSeekV3(ModelConfig.preset("tiny")), tmp_path / "plain")
    src = tmp_path / "src"
    src.mkdir()
    for f in fp8_ckpt.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    if case == "no-scale":
        scale = next(k for k in index["weight_map"] if k.endswith("_scale_inv"))
        shard = src / index["weight_map"].pop(scale)
        tensors = load_file(shard)
        del tensors[scale]
        save_file(tensors, shard)
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    elif case == "no-config":
        (src / "config.json").unlink()
    elif case == "missing-shard":
        next(src.glob("*.safetensors")).unlink()
    elif case in ("bad-block", "bad-fmt"):
        cfg = json.loads((src / "config.json").read_text())
        if case == "bad-block":
            cfg["quantization_config"]["weight_block_size"] = [128]
        else:
            cfg["quantization_config"]["fmt"] = "e5m2"
        (src / "config.json").write_text(json.dumps(cfg))
    elif case in ("bad-scale-shape", "orphan-scale"):
        shard = src / index["weight_map"]["model.layers.0.mlp.down_proj.weight_scale_inv"]
        tensors = load_file(shard)
        if case == "bad-scale-shape":  # a (160, 272) weight: 2 x 3 blocks
            tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(2, 2)
        else:  # the scale of a weight stored unquantized
            tensors["model.norm.weight_scale_inv"] = torch.ones(1, 1)
        save_file(tensors, shard)
    return src


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no-scale", "has no model."),
    ("not-fp8", "holds no FP8 weights"),
    ("no-config", "no config.json"),
    ("missing-shard", "names shard(s) that are not in"),
    ("bad-block", "weight_block_size"),
    ("bad-fmt", "fmt 'e5m2' is not supported"),
    ("bad-scale-shape", "model.layers.0.mlp.down_proj.weight_scale_inv has shape (2, 2), expected (2, 3)"),
    ("orphan-scale", "model.norm.weight_scale_inv scales no FP8 weight"),
])
def test_bad_checkpoints_are_one_line(fp8_ckpt, tmp_path, capsys, monkeypatch, case, message):
    src = _bad(tmp_path, fp8_ckpt, case)
    monkeypatch.setattr(conv, "save_file", lambda *a, **k: pytest.fail("found after writing"))  # checked up front
    assert main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek convert: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_existing_destination_and_interrupted_conversion(fp8_ckpt, tmp_path, monkeypatch, capsys):
    (tmp_path / "out").mkdir()
    assert main(["convert", str(fp8_ckpt), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    calls = []

    def failing_save(tensors, file, metadata=None):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, file, metadata=metadata)

    monkeypatch.setattr(conv, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_fp8_checkpoint(fp8_ckpt, tmp_path / "new", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written left behind
    with pytest.raises(CheckpointError, match="exists"):
        convert_fp8_checkpoint(fp8_ckpt, fp8_ckpt, progress=False)
    (tmp_path / "file").write_text("")  # a destination whose parent cannot hold a directory
    with pytest.raises(OSError, match=r"^cannot write .*file/sub/out: ") as e:
        convert_fp8_checkpoint(fp8_ckpt, tmp_path / "file" / "sub" / "out", progress=False)
    assert ".tmp-" not in str(e.value)


def test_a_killed_conversion_leaves_no_destination(fp8_ckpt, tmp_path, monkeypatch):
    """Killed half-way (no cleanup runs, as under SIGKILL): DST does not exist, so a rerun starts afresh rather than
    finding a checkpoint with shards missing."""
    calls = []

    def dying_save(tensors, file, metadata=None):
        calls.append(file)
        if len(calls) == 2:
            os._exit(0)
        save_file(tensors, file, metadata=metadata)

    monkeypatch.setattr(conv, "save_file", dying_save)
    pid = os.fork()
    if pid == 0:  # the child dies in its second save_file; it never returns to pytest
        try:
            convert_fp8_checkpoint(fp8_ckpt, tmp_path / "out", progress=False)
        finally:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    assert not (tmp_path / "out").exists()
    assert all(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())  # at most a hidden staging directory
