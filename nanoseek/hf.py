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
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import fsync_dir, fsync_tree
from .config import ModelConfig, read_config_json
from .devices import pick_device
from .errors import CheckpointError
from .fp8 import SCALE_SUFFIX, dequantize_fp8, fp8_block_size, fp8_scale_shape
from .model import DeepSeekV3

INDEX_FILE = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


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


def expected_checkpoint_shapes(model: DeepSeekV3) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``model`` must hold, by checkpoint name (experts split, no MTP copies)."""
    config = model.config
    out: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict().items():
        if _tied(config, name):
            continue
        if name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj"):
            prefix = hf_name(config, name).rsplit(".", 1)[0]
            E, rows, cols = tensor.shape
            for e in range(E):
                if name.endswith("gate_up_proj"):
                    out[f"{prefix}.{e}.gate_proj.weight"] = (rows // 2, cols)
                    out[f"{prefix}.{e}.up_proj.weight"] = (rows // 2, cols)
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = (rows, cols)
            continue
        out[hf_name(config, name)] = tuple(tensor.shape)
    return out


def _mtp_copies(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The MTP layers' copies of the embedding and the output head: checked for shape, never loaded."""
    out = {}
    for k in range(config.num_nextn_predict_layers):
        layer = config.num_hidden_layers + k
        out[f"model.layers.{layer}.embed_tokens.weight"] = (config.vocab_size, config.hidden_size)
        out[f"model.layers.{layer}.shared_head.head.weight"] = (config.vocab_size, config.hidden_size)
    return out


# ---------------------------------------------------------------------------- reading
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _Entry:
    """One tensor of the checkpoint, from the safetensors headers only (nothing is read)."""

    file: Path
    dtype: str  # safetensors dtype name: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]

    @property
    def is_fp8(self) -> bool:
        return self.dtype.startswith("F8")

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("F", "BF"))


def _read_config_json(path: Path) -> dict:
    try:
        return read_config_json(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a ``model.safetensors.index.json``."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        sorted(set(weight_map.values()))  # raises unless a dict of names to comparable shard names
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is malformed: {type(e).__name__}: {e}") from None
    return weight_map


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, [] when it has none."""
    index = path / INDEX_FILE
    single = path / "model.safetensors"
    if index.is_file():
        files = sorted(set(_weight_map(index).values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return [path / f for f in files]
    if single.is_file():
        return [single]
    return sorted(path.glob("*.safetensors"))


def _checkpoint_files(path: Path) -> list[Path]:
    files = _weight_files(path)
    if not files:
        raise CheckpointError(f"no model.safetensors or {INDEX_FILE} in {path}")
    return files


def stored_tensor_names(path: str | os.PathLike) -> set[str] | None:
    """The names of the tensors a checkpoint directory holds, from its ``model.safetensors.index.json`` or else
    the safetensors headers (no tensor data is read); None when it holds no weight files."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        return set(_weight_map(path / INDEX_FILE))
    files = _weight_files(path)
    return set(_scan(files)[0]) if files else None


def mtp_modules_stored(config: ModelConfig, names) -> int:
    """How many of ``config``'s MTP modules (``model.layers.{L + k - 1}.*``) have tensors among ``names``.
    transformers saves ``num_nextn_predict_layers`` in config.json but never these layers' weights."""
    layers = {_layer_index(name) for name in names}
    return sum(config.num_hidden_layers + k in layers for k in range(config.num_nextn_predict_layers))


def _open(file: Path):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors' SafetensorError, OSError
        raise CheckpointError(f"cannot read {file}: {e}") from None


def _scan(files: list[Path]) -> tuple[dict[str, _Entry], list[str]]:
    """Every tensor's file, dtype and shape from the headers; keys stored twice are reported."""
    entries: dict[str, _Entry] = {}
    duplicated: list[str] = []
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                if key in entries:
                    duplicated.append(f"{key} ({entries[key].file.name} and {file.name})")
                    continue
                entries[key] = _Entry(file, sl.get_dtype(), tuple(sl.get_shape()))
    return entries, duplicated


def _target_dtype(dtype: torch.dtype | None, raw: dict, entries: dict[str, _Entry]) -> torch.dtype:
    """The dtype argument; else bf16 for an FP8 checkpoint; else the dtype that holds most weights."""
    if dtype is not None:
        return dtype
    if raw.get("quantization_config") or any(e.is_fp8 for e in entries.values()):
        return torch.bfloat16
    sizes: Counter[str] = Counter()
    for key, e in entries.items():
        if e.is_float and not _keeps_fp32(key) and not key.endswith(SCALE_SUFFIX):
            sizes[e.dtype] += math.prod(e.shape)
    if not sizes:
        return torch.float32
    name = sizes.most_common(1)[0][0]
    if name not in _ST_DTYPES:
        raise CheckpointError(f"unsupported tensor dtype {name} in checkpoint")
    return _ST_DTYPES[name]


class _ExpertAssembler:
    """Writes per-expert matrices straight into preallocated (E, 2F, D) / (E, D, F) tensors, so the
    experts are never held twice."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, key: str, tensor: torch.Tensor) -> bool:
        """Take one expert tensor (shape already checked); False if the key is not a routed expert's."""
        m = _EXPERT_KEY.match(key)
        if not m:
            return False
        prefix = _expert_prefix_to_nanoseek(self.config, m.group(1))
        e, proj = int(m.group(2)), m.group(3)
        if prefix not in self.stacks:
            E, F, D = self.config.n_routed_experts, self.config.moe_intermediate_size, self.config.hidden_size
            kw = dict(dtype=tensor.dtype, device=tensor.device)
            self.stacks[prefix] = (torch.empty(E, 2 * F, D, **kw), torch.empty(E, D, F, **kw))
        gate_up, down = self.stacks[prefix]
        F = self.config.moe_intermediate_size
        if proj == "gate_proj":
            gate_up[e, :F] = tensor
        elif proj == "up_proj":
            gate_up[e, F:] = tensor
        else:
            down[e] = tensor
        return True

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, (gate_up, down) in self.stacks.items():
            out[f"{prefix}.gate_up_proj"] = gate_up
            out[f"{prefix}.down_proj"] = down
        return out


def _listing(label: str, items: list[str], limit: int = 40) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {label}: {shown}{more}"


def _layer_index(key: str) -> int:
    """L of a ``model.layers.L.*`` key, -1 for any other key."""
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return int(match.group(1)) if match else -1


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", strict: bool = True) -> DeepSeekV3:
    """Load a Hugging Face DeepSeek-V3/V2 checkpoint directory into :class:`DeepSeekV3`.

    Shards are read one at a time and each tensor is converted to its final dtype (FP8 weights dequantized)
    and device as it is read, so the checkpoint is never held twice. ``dtype`` defaults to bf16 for an FP8
    checkpoint and to the stored dtype otherwise; the router weights and balancing biases stay fp32.
    Missing, unexpected or mis-shaped tensors raise one :class:`CheckpointError` that lists them all
    (``strict=False`` tolerates unexpected ones). A checkpoint whose config.json asks for MTP layers it
    does not hold (as transformers writes them) loads without MTP, with a warning. An ``lm_head.weight`` stored
    although config.json ties it to the embedding loads when it equals the embedding (as in transformers).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point
                                  and dtype.itemsize >= 2):
        raise ValueError(f"dtype must be a floating dtype of 16 bits or more, got {dtype!r}")
    device = pick_device(device, what="device")
    raw = _read_config_json(path)
    try:
        config = ModelConfig.from_hf(raw)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    block = fp8_block_size(raw)
    files = _checkpoint_files(path)
    entries, duplicated = _scan(files)
    if config.num_nextn_predict_layers and not mtp_modules_stored(config, entries):
        # transformers writes num_nextn_predict_layers but never the MTP weights: load the main model only
        warnings.warn(f"{path} has no MTP weights (model.layers.{config.num_hidden_layers}.*): "
                      "loading without MTP modules", stacklevel=2)
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = DeepSeekV3(config)
    expected = expected_checkpoint_shapes(model)
    copies = _mtp_copies(config)
    target = _target_dtype(dtype, raw, entries)

    unexpected: list[str] = []
    mis_shaped: list[str] = []
    mistyped: list[str] = []
    beyond = config.num_hidden_layers + config.num_nextn_predict_layers  # the first layer index the model lacks
    skipped_layers: set[int] = set()
    missing_scales: list[str] = []
    seen: set[str] = set()
    tied_head: torch.Tensor | None = None  # lm_head.weight stored although config.json ties it: compared, not loaded
    loaded: dict[str, torch.Tensor] = {}
    experts = _ExpertAssembler(config)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key, entry in entries.items():
        by_file[entry.file].append(key)
    for file in files:
        with _open(file) as f:
            for key in by_file[file]:
                entry = entries[key]
                if key.endswith(SCALE_SUFFIX):
                    weight = entries.get(key[: -len(SCALE_SUFFIX)])
                    if weight is None or not weight.is_fp8:
                        unexpected.append(key)
                    continue
                if key in copies:
                    if entry.shape != copies[key]:
                        mis_shaped.append(f"{key} {entry.shape} != {copies[key]}")
                    continue
                if _tied(config, key) and entry.shape == (config.vocab_size, config.hidden_size) and entry.is_float:
                    try:
                        tied_head = f.get_tensor(key).to(target)
                    except Exception as e:  # a truncated or corrupt shard
                        raise CheckpointError(f"cannot read {key} from {file}: {e}") from None
                    continue
                if key not in expected:
                    if _layer_index(key) >= beyond:  # MTP layers the config turns off (as transformers skips them)
                        skipped_layers.add(_layer_index(key))
                    elif 0 in entry.shape:  # no data: transformers writes empty shared experts for n_shared_experts 0
                        pass
                    else:
                        unexpected.append(key)
                    continue
                seen.add(key)
                if entry.shape != expected[key]:
                    mis_shaped.append(f"{key} {entry.shape} != {expected[key]}")
                    continue
                if not entry.is_float:  # every weight and buffer of the model is floating point
                    mistyped.append(f"{key} {entry.dtype}")
                    continue
                out_dtype = torch.float32 if _keeps_fp32(key) else target
                try:
                    if entry.is_fp8:
                        scale_key = key + SCALE_SUFFIX
                        scale_entry = entries.get(scale_key)
                        if scale_entry is None:
                            missing_scales.append(scale_key)
                            continue
                        want = fp8_scale_shape(entry.shape, block) if len(entry.shape) == 2 else None
                        if scale_entry.shape != want:
                            mis_shaped.append(f"{scale_key} {scale_entry.shape} != {want}")
                            continue
                        scale = _read(f, file, scale_key, scale_entry)
                        tensor = dequantize_fp8(f.get_tensor(key), scale, out_dtype, block)
                    else:
                        tensor = f.get_tensor(key)
                        if tensor.is_floating_point():
                            tensor = tensor.to(out_dtype)
                except CheckpointError:
                    raise
                except Exception as e:  # a truncated or corrupt shard
                    raise CheckpointError(f"cannot read {key} from {file}: {e}") from None
                tensor = tensor.to(device)
                if not experts.add(key, tensor):
                    loaded[nanoseek_name(config, key)] = tensor
                del tensor

    if skipped_layers:
        warnings.warn(f"{path}: config.json has num_nextn_predict_layers={config.num_nextn_predict_layers}, so the "
                      f"weights of layer(s) {', '.join(map(str, sorted(skipped_layers)))} (MTP) are not loaded",
                      stacklevel=2)
    missing = sorted([k for k in expected if k not in seen] + missing_scales, key=_natural)
    problems = []
    if missing:
        problems.append(_listing("missing", missing))
    if unexpected and strict:
        problems.append(_listing("unexpected", sorted(unexpected, key=_natural)))
    if mis_shaped:
        problems.append(_listing("mis-shaped", sorted(mis_shaped, key=_natural)))
    if mistyped:
        problems.append(_listing("not floating point", sorted(mistyped, key=_natural)))
    if duplicated:
        problems.append(_listing("stored twice", duplicated))
    embedding = loaded.get("embed_tokens.weight")
    if tied_head is not None and embedding is not None and not torch.equal(tied_head.to(device), embedding):
        problems.append("lm_head.weight differs from model.embed_tokens.weight, but config.json ties them "
                        "(tie_word_embeddings=true): set it to false to load the two")
    if problems:
        err = CheckpointError(f"checkpoint {path} does not match its config.json: " + "; ".join(problems))
        err.missing, err.unexpected, err.mis_shaped = missing, unexpected, mis_shaped
        raise err
    loaded.update(experts.tensors())
    model.load_state_dict(loaded, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.inv_freq = type(model.rotary)(config).inv_freq.to(device)  # non-persistent: rebuild off meta
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # would be a bug here, not a checkpoint problem
        raise RuntimeError(f"load_pretrained left tensors unloaded: {', '.join(left)}")
    return model


def _read(f, file: Path, key: str, entry: _Entry) -> torch.Tensor:
    """A tensor from the open shard, or from the shard that holds it (a scale stored apart from its weight)."""
    if entry.file == file:
        return f.get_tensor(key)
    with _open(entry.file) as g:
        return g.get_tensor(key)


def _tied(config: ModelConfig, name: str) -> bool:
    return config.tie_word_embeddings and name == "lm_head.weight"


def _keeps_fp32(name: str) -> bool:
    return name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")


# ---------------------------------------------------------------------------- writing
def save_pretrained(model: DeepSeekV3, path: str | os.PathLike, max_shard_bytes: int = 4 << 30,
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json and safetensors (``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` above ``max_shard_bytes``, else ``model.safetensors``) in the
    checkpoint layout transformers and DeepSeek's tools read, MTP layers included (SPEC §5).

    Each shard is written as soon as it is full, so at most one shard of converted copies is held. The
    directory is written next to the target and renamed into place, so an interrupted save never leaves a
    half-written checkpoint behind; an existing directory's other files (e.g. tokenizer) are kept.
    Router weights and balancing biases stay fp32 whatever ``dtype`` says. ``model`` may be wrapped by
    ``torch.compile``.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: its names all start with _orig_mod.
    if not isinstance(model, DeepSeekV3):
        raise TypeError(f"save_pretrained writes a nanoseek DeepSeekV3, got {type(model).__name__}")
    path = Path(path)
    if path.is_symlink() and path.is_dir():  # save into the directory the link names; the link stays
        path = path.resolve()
    path = Path(os.path.abspath(path))  # "dir/..": a real name to write next to and rename
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    if path.exists() and Path.cwd().resolve().is_relative_to(path.resolve()):
        raise CheckpointError(f"cannot save into {path}: the directory is replaced as a whole, and it holds the "
                              "current working directory; save to another directory")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point
                                  and dtype.itemsize >= 2):
        raise ValueError(f"save_pretrained writes unquantized weights: dtype must be a floating dtype of "
                         f"16 bits or more, got {dtype!r}")
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # unlike mkdtemp, respects the umask: the checkpoint gets ordinary permissions
    except OSError as e:
        raise CheckpointError(f"cannot write a checkpoint at {path}: {e.strerror}") from None
    try:
        written: list[tuple[Path, list[str]]] = []
        shard: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush() -> None:
            nonlocal shard, size
            file = tmp / f"shard-{len(written):05d}.tmp"
            save_file(shard, file, metadata={"format": "pt"})
            written.append((file, list(shard)))
            shard, size = {}, 0

        for key, tensor in to_hf_state_dict(model):
            t = tensor.detach()
            if t.is_floating_point():
                if _keeps_fp32(key):
                    t = t.float()
                elif dtype is not None:
                    t = t.to(dtype)
            t = t.to("cpu").contiguous()
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
            shard[key] = t
            size += nbytes
            total += nbytes
        flush()
        if len(written) == 1:
            os.replace(written[0][0], tmp / "model.safetensors")
        else:
            weight_map = {}
            n = len(written)
            for i, (file, keys) in enumerate(written, start=1):
                name = f"model-{i:05d}-of-{n:05d}.safetensors"
                os.replace(file, tmp / name)
                weight_map.update({k: name for k in keys})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        hf = model.config.to_hf()
        hf.pop("quantization_config", None)  # the weights written here are not quantized
        saved = dtype or model.embed_tokens.weight.dtype
        hf["dtype"] = hf["torch_dtype"] = str(saved).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        replacing = path.exists()
        if replacing:
            _carry_over(path, tmp)
        fsync_tree(tmp)
        if replacing:
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    return path


def _carry_over(old: Path, new: Path) -> None:
    """Keep the files of an existing directory that are not the checkpoint's (tokenizer, training state):
    hard links where possible, copies otherwise."""
    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for item in old.iterdir():
        if item.name == "config.json" or (item.name.startswith("model") and item.name.endswith((".safetensors", ".json"))):
            continue
        target = new / item.name
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, target, copy_function=link_or_copy, symlinks=True)
        elif item.is_symlink():
            os.symlink(os.readlink(item), target)
        else:
            link_or_copy(item, target)
