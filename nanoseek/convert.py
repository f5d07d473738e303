"""FP8 -> bf16 checkpoint conversion (SPEC §7), on the CPU, one safetensors shard at a time.

The public DeepSeek-V3/R1 weights store most Linear weights as float8_e4m3fn ``x.weight`` with an fp32
``x.weight_scale_inv`` of shape [ceil(out/128), ceil(in/128)]. :func:`convert_fp8_checkpoint` writes a checkpoint
every loader reads: each FP8 weight dequantized (:func:`nanoseek.fp8.dequantize_fp8`) to the target dtype, the
scale tensors dropped, every other tensor copied unchanged, each shard under its own name,
``model.safetensors.index.json`` without the scale keys, ``config.json`` without ``quantization_config``, and the
checkpoint's other files (tokenizer, generation config, ...) copied. Memory is bounded by one shard: the whole
model is never loaded. The new directory is written next to DST and renamed into place when complete, so an
interrupted conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import fsync_dir, fsync_tree
from .config import read_config_json
from .errors import CheckpointError
from .fp8 import SCALE_SUFFIX, dequantize_fp8, fp8_block_size

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FP8 = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class ConvertReport:
    path: Path  # the new checkpoint directory
    shards: int  # safetensors files written
    tensors: int  # tensors written
    dequantized: int  # FP8 weights dequantized
    total_bytes: int  # bytes of tensor data written


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _shards(src: Path) -> tuple[list[str], dict | None]:
    """The shard file names in order, and the index (None for a single-file checkpoint)."""
    index_file = src / INDEX_FILE
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index_file} is not valid JSON: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file} has no weight_map")
        names = sorted(set(weight_map.values()), key=_natural)
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise CheckpointError(f"{index_file} names shard(s) that are not in {src}: {', '.join(missing[:5])}")
        return names, index
    if (src / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    raise CheckpointError(f"{src} has no {SINGLE_FILE} or {INDEX_FILE}")


def _scan(src: Path, shards: list[str]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """key -> (shard, safetensors dtype, shape), from the headers only."""
    entries: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for shard in shards:
        try:
            with safe_open(src / shard, framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    if key in entries:
                        raise CheckpointError(f"{key} is stored in both {entries[key][0]} and {shard}")
                    entries[key] = (shard, s.get_dtype(), tuple(s.get_shape()))
        except CheckpointError:
            raise
        except Exception as e:  # not a safetensors file, truncated header, ...
            raise CheckpointError(f"cannot read {src / shard}: {e}") from None
    return entries


def convert_fp8_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                           *, progress: bool = True) -> ConvertReport:
    """Dequantize the FP8 checkpoint ``src`` into a new checkpoint directory ``dst`` (which must not exist).

    FP8 weights become ``dtype`` (bf16 by default); all other tensors are copied as stored. Raises
    :class:`nanoseek.hf.CheckpointError` (a ``ValueError``) with one line for a missing or malformed checkpoint,
    an FP8 weight without its scale (or a scale of the wrong shape), or a checkpoint with no FP8 weights.
    """
    from tqdm.auto import tqdm

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CheckpointError(f"checkpoint directory {src} does not exist")
    if not src.is_dir():
        raise CheckpointError(f"checkpoint path {src} is not a directory")
    if dst.exists():
        raise CheckpointError(f"{dst} already exists: choose a new directory for the converted checkpoint")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2):
        raise ValueError(f"dtype must be a floating dtype of 16 bits or more, got {dtype!r}")
    try:
        raw = read_config_json(src)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    block = fp8_block_size(raw)
    shards, index = _shards(src)
    entries = _scan(src, shards)

    fp8 = [k for k, (_, dt, _) in entries.items() if dt in _FP8]
    if not fp8:
        raise CheckpointError(f"{src} holds no FP8 weights: nothing to dequantize")
    problems = []
    for key in fp8:
        scale = entries.get(key + SCALE_SUFFIX)
        shape = entries[key][2]
        if len(shape) != 2:
            problems.append(f"{key} is FP8 but not 2-D {shape}")
        elif scale is None:
            problems.append(f"{key} has no {key + SCALE_SUFFIX}")
        elif scale[2] != (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])):
            problems.append(f"{key + SCALE_SUFFIX} has shape {scale[2]}, expected "
                            f"{(math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))} for {shape}")
    fp8_set = set(fp8)
    scales = {k for k in entries if k.endswith(SCALE_SUFFIX)}
    problems += [f"{k} scales no FP8 weight" for k in sorted(scales) if k[: -len(SCALE_SUFFIX)] not in fp8_set]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{src}: " + "; ".join(problems[:3]) + more)

    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:  # the staging directory's name would only confuse: name the destination
        raise OSError(f"cannot write {dst}: {e.strerror}") from None
    tensors = dequantized = total = 0
    weight_map: dict[str, str] = {}
    try:
        for shard in tqdm(shards, desc="convert", unit="shard", disable=not progress):
            out: dict[str, torch.Tensor] = {}
            with safe_open(src / shard, framework="pt") as f:
                for key in f.keys():
                    if key in scales:
                        continue
                    tensor = f.get_tensor(key)
                    if key in fp8_set:
                        scale_shard = entries[key + SCALE_SUFFIX][0]
                        if scale_shard == shard:
                            scale = f.get_tensor(key + SCALE_SUFFIX)
                        else:  # a scale stored in another shard: read just that tensor
                            with safe_open(src / scale_shard, framework="pt") as g:
                                scale = g.get_tensor(key + SCALE_SUFFIX)
                        tensor = dequantize_fp8(tensor, scale, dtype, block)
                        dequantized += 1
                    out[key] = tensor.contiguous()
                    weight_map[key] = shard
                    total += tensor.numel() * tensor.element_size()
            tensors += len(out)
            save_file(out, tmp / shard, metadata={"format": "pt"})
            del out

        if index is not None:
            new_index = {"metadata": {**(index.get("metadata") or {}), "total_size": total},
                         "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _natural(kv[0])))}
            (tmp / INDEX_FILE).write_text(json.dumps(new_index, indent=2) + "\n", encoding="utf-8")
        config = {k: v for k, v in raw.items() if k != "quantization_config"}
        name = str(dtype).removeprefix("torch.")
        config["torch_dtype"] = name
        if "dtype" in config:
            config["dtype"] = name
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # everything else (tokenizer files, generation_config.json, code, docs) comes along unchanged
        written = {"config.json", INDEX_FILE, *shards}
        for item in src.iterdir():
            if item.name in written or item.name.startswith(".") or item.suffix == ".safetensors":
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name, symlinks=True)
            else:
                shutil.copy2(item, tmp / item.name)
        fsync_tree(tmp)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dst.parent)
    return ConvertReport(path=dst, shards=len(shards), tensors=tensors, dequantized=dequantized, total_bytes=total)
