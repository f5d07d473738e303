"""Hugging Face checkpoints both ways: config.json + safetensors (single file or sharded with an index),
FP8 block-quantized weights (SPEC §7), and the MTP layers stored as ``model.layers.{L + k - 1}.*`` (SPEC §5).

nanoseek keeps the routed experts as 3-D tensors (E, 2F, D) and (E, D, F); the checkpoint stores one
``gate_proj`` / ``up_proj`` / ``down_proj`` matrix per expert. The converters below are the only place
that knows both layouts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import DeepSeekV3

FP8_BLOCK = 128
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: bad path, malformed config, missing / unexpected / mis-shaped tensors."""


# ---------------------------------------------------------------------------- names
def hf_name(config: ModelConfig, name: str) -> str:
    """Checkpoint name of a nanoseek parameter (experts excluded: they are split per expert)."""
    L = config.num_hidden_layers
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        layer, rest = L + int(m.group(1)), m.group(2)
        if rest.startswith("block."):
            rest = rest[len("block."):]
        elif rest == "norm.weight":
            rest = "shared_head.norm.weight"
        return f"model.layers.{layer}.{rest}"
    if name == "lm_head.weight":
        return name
    return f"model.{name}"


def nanoseek_name(config: ModelConfig, key: str) -> str | None:
    """nanoseek name of a checkpoint tensor, or None for tensors nanoseek does not keep (MTP copies)."""
    L = config.num_hidden_layers
    if key == "lm_head.weight":
        return key
    if not key.startswith("model."):
        return key  # reported as unexpected by the caller
    rest = key[len("model."):]
    m = re.match(r"^layers\.(\d+)\.(.*)$", rest)
    if m and int(m.group(1)) >= L:
        k, sub = int(m.group(1)) - L, m.group(2)
        if sub in ("embed_tokens.weight", "shared_head.head.weight"):
            return None  # copies of the shared embedding / output head
        if sub == "shared_head.norm.weight":
            return f"mtp.{k}.norm.weight"
        if sub.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
            return f"mtp.{k}.{sub}"
        return f"mtp.{k}.block.{sub}"
    return rest


def _expert_prefix_to_nanoseek(config: ModelConfig, prefix: str) -> str:
    """'model.layers.5.mlp.experts' -> 'layers.5.mlp.experts' (or the MTP equivalent)."""
    name = nanoseek_name(config, prefix + ".gate_up_proj")
    assert name is not None
    return name[: -len(".gate_up_proj")]


# ---------------------------------------------------------------------------- state dict conversion
def to_hf_state_dict(model: DeepSeekV3) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, tensor) pairs in checkpoint layout, experts split, MTP copies added."""
    config = model.config
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj"):
            prefix = hf_name(config, name).rsplit(".", 1)[0]  # ...mlp.experts
            if name.endswith("gate_up_proj"):
                gate, up = tensor.chunk(2, dim=1)  # (E, F, D) each
                for e in range(tensor.shape[0]):
                    yield f"{prefix}.{e}.gate_proj.weight", gate[e].clone()
                    yield f"{prefix}.{e}.up_proj.weight", up[e].clone()
            else:
                for e in range(tensor.shape[0]):
                    yield f"{prefix}.{e}.down_proj.weight", tensor[e].clone()
            continue
        yield hf_name(config, name), tensor
    for k in range(config.num_nextn_predict_layers):
        layer = config.num_hidden_layers + k
        yield f"model.layers.{layer}.embed_tokens.weight", model.embed_tokens.weight.detach().clone()
        yield f"model.layers.{layer}.shared_head.head.weight", model.lm_head.weight.detach().clone()


class _ExpertAssembler:
    """Collects per-expert matrices into the (E, 2F, D) / (E, D, F) parameters, one layer at a time."""

    def __init__(self, config: ModelConfig, expected: dict[str, torch.Size]):
        self.config = config
        self.expected = expected
        self.parts: dict[str, dict[tuple[int, str], torch.Tensor]] = defaultdict(dict)

    def add(self, key: str, tensor: torch.Tensor) -> str | None:
        """Take one expert tensor; return its nanoseek parameter prefix, or None if the key is not an expert."""
        m = _EXPERT_KEY.match(key)
        if not m:
            return None
        prefix = _expert_prefix_to_nanoseek(self.config, m.group(1))
        self.parts[prefix][(int(m.group(2)), m.group(3))] = tensor
        return prefix

    def complete(self, prefix: str) -> dict[str, torch.Tensor] | None:
        """The stacked parameters once every expert of the layer has arrived."""
        E = self.config.n_routed_experts
        parts = self.parts[prefix]
        if len(parts) < 3 * E:
            return None
        del self.parts[prefix]
        gate_up = torch.stack([torch.cat((parts[(e, "gate_proj")], parts[(e, "up_proj")]), 0) for e in range(E)])
        down = torch.stack([parts[(e, "down_proj")] for e in range(E)])
        return {f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": down}

    def leftovers(self) -> list[str]:
        out = []
        for prefix, parts in self.parts.items():
            E = self.config.n_routed_experts
            for e in range(E):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    if (e, proj) not in parts:
                        out.append(f"{prefix}.{e}.{proj}.weight")
            out += [f"{prefix}.{e}.{proj}.weight" for (e, proj) in parts if e >= E]
        return out


# ---------------------------------------------------------------------------- FP8
def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   block: int = FP8_BLOCK) -> torch.Tensor:
    """weight (out, in) float8_e4m3fn times its per-(128 x 128)-block scale (ceil(out/128), ceil(in/128))."""
    out_dim, in_dim = weight.shape
    rows, cols = math.ceil(out_dim / block), math.ceil(in_dim / block)
    if tuple(scale_inv.shape) != (rows, cols):
        raise CheckpointError(f"FP8 scale of shape {tuple(scale_inv.shape)} does not match weight "
                              f"{tuple(weight.shape)} (expected {(rows, cols)})")
    scale = scale_inv.float().repeat_interleave(block, 0)[:out_dim].repeat_interleave(block, 1)[:, :in_dim]
    return (weight.float() * scale).to(dtype)


def quantize_fp8(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 quantization as in the public checkpoints (for tests and round trips)."""
    out_dim, in_dim = weight.shape
    rows, cols = math.ceil(out_dim / block), math.ceil(in_dim / block)
    w = weight.float()
    padded = torch.zeros(rows * block, cols * block)
    padded[:out_dim, :in_dim] = w
    blocks = padded.view(rows, block, cols, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max  # (rows, cols)
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows * block, cols * block)
    return q[:out_dim, :in_dim].contiguous(), scale


# ---------------------------------------------------------------------------- reading
def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return [path / f for f in files]
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", strict: bool = True) -> DeepSeekV3:
    """Load a Hugging Face DeepSeek-V3/V2 checkpoint directory into :class:`DeepSeekV3`.

    Shards are read one at a time; FP8 weights are dequantized as they are read, so the checkpoint is
    never held twice. ``dtype`` defaults to the checkpoint's (bf16 for FP8 checkpoints); the router
    weights and balancing biases stay fp32. Missing, unexpected or mis-shaped tensors raise one
    :class:`CheckpointError` that lists them all.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        config = ModelConfig.from_hf(path)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    files = _checkpoint_files(path)
    if config.num_nextn_predict_layers and not _has_mtp_weights(config, files):
        # transformers writes num_nextn_predict_layers but never the MTP weights: load the main model only
        warnings.warn(f"{path} has no MTP weights (model.layers.{config.num_hidden_layers}.*): "
                      "loading without MTP modules", stacklevel=2)
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = DeepSeekV3(config)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    target_dtype = dtype
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mis_shaped: list[str] = []
    assembler = _ExpertAssembler(config, expected)
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            key_set = set(keys)
            for key in keys:
                if key.endswith("_scale_inv"):
                    if key[: -len("_scale_inv")] not in key_set:
                        unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_key = key + "_scale_inv"
                    if scale_key not in key_set:
                        raise CheckpointError(f"{file.name}: FP8 tensor {key} has no {scale_key}")
                    tensor = dequantize_fp8(tensor, f.get_tensor(scale_key), dtype or torch.bfloat16)
                    target_dtype = target_dtype or torch.bfloat16
                prefix = assembler.add(key, tensor)
                if prefix is not None:
                    stacked = assembler.complete(prefix)
                    for name, value in (stacked or {}).items():
                        _place(name, value, expected, loaded, mis_shaped, key=name)
                    continue
                name = nanoseek_name(config, key)
                if name is None:
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                _place(name, tensor, expected, loaded, mis_shaped, key=key)
    unexpected += assembler.leftovers() if strict else []
    missing = sorted(hf_name(config, n) for n in expected if n not in loaded and not _tied(config, n))
    problems = []
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected: {', '.join(sorted(unexpected))}")
    if mis_shaped:
        problems.append(f"mis-shaped: {', '.join(mis_shaped)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config.json; " + "; ".join(problems))
    if target_dtype is None:
        target_dtype = next(iter(loaded.values())).dtype if loaded else torch.float32
    state = {n: (t if _keeps_fp32(n) else t.to(target_dtype)) for n, t in loaded.items()}
    model.load_state_dict(_with_tied(config, state), strict=False, assign=True)
    model.rotary.inv_freq = type(model.rotary)(config).inv_freq  # non-persistent buffer: rebuild off meta
    return model.to(device)


def _has_mtp_weights(config: ModelConfig, files: list[Path]) -> bool:
    prefix = f"model.layers.{config.num_hidden_layers}."
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            if any(k.startswith(prefix) for k in f.keys()):
                return True
    return False


def _tied(config: ModelConfig, name: str) -> bool:
    return config.tie_word_embeddings and name == "lm_head.weight"


def _with_tied(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if config.tie_word_embeddings:
        state = dict(state)
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def _keeps_fp32(name: str) -> bool:
    return name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")


def _place(name, tensor, expected, loaded, mis_shaped, key):
    if tuple(tensor.shape) != tuple(expected[name]):
        mis_shaped.append(f"{key} {tuple(tensor.shape)} != {tuple(expected[name])}")
        return
    loaded[name] = tensor


# ---------------------------------------------------------------------------- writing
def save_pretrained(model: DeepSeekV3, path: str | os.PathLike, max_shard_bytes: int = 4 << 30,
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json and safetensors (sharded with model.safetensors.index.json above
    ``max_shard_bytes``) in the checkpoint layout transformers and DeepSeek's tools read.

    The directory is written next to the target and renamed into place, so an interrupted save never
    leaves a half-written checkpoint behind; an existing directory's other files (e.g. tokenizer) are kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        sizes = [0]
        for key, tensor in to_hf_state_dict(model):
            t = tensor.detach()
            if dtype is not None and t.is_floating_point() and not _keeps_fp32(key):
                t = t.to(dtype)
            t = t.to("cpu").contiguous()
            nbytes = t.numel() * t.element_size()
            if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
                shards.append({})
                sizes.append(0)
            shards[-1][key] = t
            sizes[-1] += nbytes
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            n = len(shards)
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf = model.config.to_hf()
        if dtype is not None:
            hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        else:
            hf["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if path.exists():  # keep files we do not own (tokenizer, training state)
            for item in path.iterdir():
                if item.name.startswith("model") and item.name.endswith((".safetensors", ".json")):
                    continue
                if item.name == "config.json":
                    continue
                target = tmp / item.name
                if item.is_dir():
                    shutil.copytree(item, target)
                else:
                    shutil.copy2(item, target)
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "ckpt")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
