"""Building the model a training run trains: its ModelConfig (the preset, the user's overrides, the tokenizer),
its initial weights (a checkpoint to resume, a seed, or another run's weights with ``--init-from``), and the
runtime wrappers around it (autocast, activation checkpointing). Shared by the single-process and the
distributed trainer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from ..config import ModelConfig
from .. import devices
from ..hf import load_pretrained
from ..model import DeepSeekV3
from . import checkpoint as ckpt_io
from .config import MIN_VOCAB, TrainConfig


# ---------------------------------------------------------------------------------------------- model config
def model_config(cfg: TrainConfig, vocab_size: int, bos_id: int, eos_id: int) -> ModelConfig:
    """The preset, the user's overrides, the tokenizer's vocabulary and special ids, the MTP depth."""
    base = ModelConfig.preset(cfg.preset)
    overrides = dict(cfg.model_overrides)
    unknown = sorted(set(overrides) - set(base.to_dict()))
    if unknown:
        raise ValueError(f"unknown model settings: {', '.join(unknown)}")
    special = sorted({"bos_token_id", "eos_token_id"} & set(overrides))
    if special:
        raise ValueError(f"--model {special[0]}: the special token ids are the tokenizer's (its "
                         "<｜begin▁of▁sentence｜> and <｜end▁of▁sentence｜>), not a model setting")
    vocab = overrides.pop("vocab_size", vocab_size)
    if isinstance(vocab, bool) or not isinstance(vocab, int):
        raise ValueError(f"--model vocab_size must be an integer, got {vocab!r}")
    if vocab < vocab_size:
        raise ValueError(f"model vocab_size {vocab} is smaller than the tokenizer's {vocab_size} tokens")
    if cfg.mtp_depth is not None:
        if overrides.get("num_nextn_predict_layers", cfg.mtp_depth) != cfg.mtp_depth:
            raise ValueError(f"--mtp-depth {cfg.mtp_depth} and --model num_nextn_predict_layers="
                             f"{overrides['num_nextn_predict_layers']} set the same MTP depth: give one of them")
        overrides["num_nextn_predict_layers"] = cfg.mtp_depth
    mc = base.replace(vocab_size=vocab, bos_token_id=bos_id, eos_token_id=eos_id, **overrides)
    if cfg.seq_len > mc.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"({mc.max_position_embeddings})")
    if mc.num_nextn_predict_layers >= cfg.seq_len:
        raise ValueError(f"MTP depth {mc.num_nextn_predict_layers} needs --seq-len above it, got {cfg.seq_len}")
    return mc


def check_model_settings(cfg: TrainConfig, new_run: bool = True) -> ModelConfig:
    """Before the data is read (a typo then fails in a second, not after the corpus and the tokenizer): the
    preset, the --model settings, --mtp-depth and --seq-len as model_config checks them, with the vocabulary the
    tokenizer will have when it is trained here (else the smallest); a new run's --init-from and --tokenizer must
    exist (a resumed run reads neither)."""
    for flag, path in (("--init-from", cfg.init_from), ("--tokenizer", cfg.tokenizer)):
        if new_run and path and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    return model_config(cfg, cfg.vocab_size if cfg.tokenizer is None else MIN_VOCAB, 0, 1)


# ---------------------------------------------------------------------------------------------- init_from
# ModelConfig fields a run started from another model's weights may change: the RoPE scaling (a context
# extension with YaRN, SPEC §2) and the maximum length. Every other field shapes the weights or their meaning.
INIT_FROM_MAY_CHANGE = ("rope_theta", "rope_scaling_type", "rope_factor", "original_max_position_embeddings",
                        "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "max_position_embeddings")


def init_from_tokenizer(cfg: TrainConfig) -> Path | None:
    """The tokenizer a new run started from ``cfg.init_from`` trains with when ``--tokenizer`` is not given: the
    source's own (its weights mean its token ids), if it has one."""
    if not cfg.init_from or cfg.tokenizer:
        return None
    path = Path(cfg.init_from) / "tokenizer.json"
    return path if path.is_file() else None


def initialize_from(model: DeepSeekV3, source: str | Path, tokenizer=None) -> None:
    """Copy every weight of the run directory or checkpoint ``source`` (routers' biases and MTP modules
    included) into ``model``, whose configuration may differ from the source's only in INIT_FROM_MAY_CHANGE.
    ``tokenizer`` (the run's ``tokenizers.Tokenizer``) must give every token the id the source's tokenizer.json
    gives it."""
    if not Path(source).is_dir():
        raise FileNotFoundError(f"--init-from {source}: no such run directory or checkpoint")
    theirs_file = Path(source) / "tokenizer.json"
    if tokenizer is not None and theirs_file.is_file():
        from .tokenizer_train import load_tokenizer

        ours_vocab = tokenizer.get_vocab(with_added_tokens=True)
        theirs_vocab = load_tokenizer(theirs_file).get_vocab(with_added_tokens=True)
        moved = sum(theirs_vocab.get(t) != i for t, i in ours_vocab.items())
        if moved or len(theirs_vocab) != len(ours_vocab):
            raise ValueError(f"--init-from {source}: its tokenizer differs from this run's ({moved} of "
                             f"{len(ours_vocab)} tokens have other ids or are not in it), so its weights would "
                             f"read the wrong tokens; leave out --tokenizer to train with the source's")
    src = load_pretrained(source, dtype=torch.float32, device=model.embed_tokens.weight.device)
    ours, theirs = model.config.to_dict(), src.config.to_dict()
    diff = [f"{k} {ours[k]!r} (theirs {theirs.get(k)!r})" for k in ours
            if k not in INIT_FROM_MAY_CHANGE and ours[k] != theirs.get(k)]
    if diff:
        raise ValueError(f"--init-from {source}: its model differs from this run's in {'; '.join(diff)} "
                         "(only the RoPE scaling and max_position_embeddings may change)")
    model.load_state_dict(src.state_dict())


def build_model(cfg: TrainConfig, mc: ModelConfig, device: torch.device, resume_from: Path | None,
                log: Callable[[str], None], tokenizer=None) -> DeepSeekV3:
    """The run's model in training mode: the checkpoint's (``resume_from``, which must have the configured
    architecture), or a new one from the seed, started from ``cfg.init_from``'s weights when given."""
    if resume_from is not None:
        model = ckpt_io.load_model(resume_from, device)
        if model.config.to_hf() != mc.to_hf():
            diff = sorted(k for k, v in mc.to_hf().items() if model.config.to_hf().get(k) != v)
            raise ValueError(f"cannot resume from {resume_from}: the checkpoint's model differs from the "
                             f"configuration ({', '.join(diff)})")
    else:
        torch.manual_seed(cfg.seed)
        model = DeepSeekV3(mc).to(device)
        if cfg.init_from:
            initialize_from(model, cfg.init_from, tokenizer)
            log(f"initialized from the weights of {cfg.init_from}")
    return model.train()


# ---------------------------------------------------------------------------------------------- runtime helpers
DTYPE_NOTES = {"bf16": "bf16 autocast (fp32 weights)", "bf16-weights": "bf16 weights, fp32 master weights",
               "fp32": "fp32", "fp8": "FP8 products of the linear layers (emulated: e4m3, 1 x 128 tiles, 128 x 128 "
                                      "weight blocks), fp32 elsewhere"}


def precision_note(dtype: str, device: torch.device) -> str:
    """How the run computes, for the log: ``--dtype bf16`` falls back to fp32 on a device without native bf16
    products (see autocast_context); ``--dtype bf16-weights`` is kept there, with a warning."""
    if devices.training_dtype(dtype, device) != dtype:
        return (f"fp32 (--dtype bf16 autocasts only where bf16 products are native, and this {device.type} "
                f"has none)")
    if dtype == "bf16-weights" and not devices.native_bf16(device):
        return (f"{DTYPE_NOTES[dtype]} (warning: this {device.type} has no native bf16 products, so they run "
                f"in fp32 on the bf16 values and round back, ~1.6x slower than --dtype fp32: prefer --dtype bf16 "
                f"or fp32)")
    return DTYPE_NOTES[dtype]


def autocast_context(device: torch.device, dtype: str,
                     model: DeepSeekV3 | None = None) -> Callable[[], contextlib.AbstractContextManager]:
    """The context of the training forward: bf16 autocast (``--dtype bf16`` on a device with native bf16
    products, see nanoseek.devices.training_dtype; elsewhere fp32), FP8 products of ``model``'s linear layers
    (fp8, emulated: train/fp8_mixed.py) or nothing."""
    if dtype == "fp8":
        from .fp8_mixed import fp8_gemms

        return fp8_gemms(model)
    if devices.training_dtype(dtype, device) != "bf16":  # bf16 where the device runs it natively, else fp32
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def enable_activation_checkpointing(model: DeepSeekV3) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(model.layers) + [m.block for m in model.mtp]
    for block in blocks:
        forward = block.forward

        def wrapped(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped
