"""The ``nanoseek`` command line: ``nanoseek info``, with more subcommands added as features land.

This module is the console script's entry point: it imports only what is light at the top, so that a Ctrl-C
while torch and the feature modules are imported (in :func:`main`) ends with one line, not a stack trace."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from .errors import defer_to_rank0, on_rank0, report_error

if TYPE_CHECKING:
    from .config import ModelConfig


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def model_summary(config: ModelConfig, dtype_bytes: int = 2) -> dict:
    """Parameter counts (from a meta-device model: no memory) and KV-cache sizes per token."""
    import torch

    from .model import DeepSeekV3, count_parameters, kv_cache_elements_per_token

    with torch.device("meta"):
        model = DeepSeekV3(config)
    summary = count_parameters(model)
    cache = kv_cache_elements_per_token(config)
    summary.update(cache)
    summary["kv_cache_bytes_per_token"] = cache["kv_cache_elements_per_token"] * dtype_bytes
    summary["mha_cache_bytes_per_token"] = cache["mha_cache_elements_per_token"] * dtype_bytes
    summary["transformers_cache_bytes_per_token"] = cache["transformers_cache_elements_per_token"] * dtype_bytes
    summary["cache_dtype_bytes"] = dtype_bytes
    return summary


def _mtp_in_weights(path: str, config: ModelConfig) -> int | None:
    """How many of config.json's MTP modules a checkpoint's weights hold (transformers saves none); None when
    the directory holds no weight files."""
    from .hf import mtp_modules_stored, stored_tensor_names

    names = stored_tensor_names(path)
    return None if names is None else mtp_modules_stored(config, names)


def _mtp_text(config: ModelConfig, in_weights: int | None) -> str:
    """The MTP part of info's first line: config.json's count, and what the weights hold where that differs."""
    text = f"{config.num_nextn_predict_layers} MTP module(s)"
    if in_weights is None or in_weights == config.num_nextn_predict_layers:
        return text
    if in_weights == 0:
        return (f"{text} in config.json, none in the weights (transformers drops them): "
                "speculative decoding unavailable")
    return f"{text} in config.json, {in_weights} in the weights"


def _mtp_missing(config: ModelConfig, in_weights: int | None) -> str:
    """A note for the MTP parameter count when the weights lack some of config.json's MTP modules."""
    n = config.num_nextn_predict_layers
    if in_weights is None or in_weights == n:
        return ""
    return ", not in the weights" if in_weights == 0 else f", {in_weights} of {n} modules in the weights"


def cmd_info(args: argparse.Namespace) -> int:
    from .config import ModelConfig

    in_weights = None  # MTP modules in the checkpoint's weights
    if args.checkpoint:
        try:
            config = ModelConfig.from_hf(args.checkpoint)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{args.checkpoint}: {e}") from None
        name = args.checkpoint
        in_weights = _mtp_in_weights(args.checkpoint, config)
    else:
        config = ModelConfig.preset(args.preset)
        name = args.preset
    s = model_summary(config)
    if args.checkpoint:
        s["mtp_modules_in_weights"] = in_weights  # null: no weight files
    context = getattr(args, "context", None)
    if context is not None:
        if context <= 0:
            raise ValueError(f"--context must be a positive number of tokens, got {context}")
        from .eval_long import cache_report

        s["cache_at_context"] = cache_report(config, context, s["cache_dtype_bytes"])
    if args.json:
        print(json.dumps({"model": name, **s, "config": config.to_dict()}, indent=2))
        return 0
    c = config
    dense = min(c.first_k_dense_replace, c.num_hidden_layers)
    print(f"{name}: {c.num_hidden_layers} layers ({dense} dense, "
          f"{c.num_hidden_layers - dense} MoE), d={c.hidden_size}, {c.num_attention_heads} heads, "
          f"{c.n_shared_experts} shared + {c.n_routed_experts} routed experts, {c.num_experts_per_tok} active, "
          f"{_mtp_text(c, in_weights)}")
    if args.checkpoint and in_weights is None:
        print(f"  {name} holds no weight files (model.safetensors or model.safetensors.index.json): "
              "the figures below are config.json's, MTP included")
    rows = [
        ("total parameters (main model)", f"{s['total_params']:,}", _human(s["total_params"])),
        ("MTP parameters (unique)", f"{s['mtp_params']:,}", _human(s["mtp_params"]) + _mtp_missing(c, in_weights)),
        ("activated per token", f"{s['activated_params']:,}", _human(s["activated_params"])),
        ("activated per token, no embedding", f"{s['activated_params_without_embedding']:,}",
         _human(s["activated_params_without_embedding"])),
        ("KV cache / token, MLA latent", f"{s['kv_cache_elements_per_token']:,} elements",
         f"{s['kv_cache_bytes_per_token'] / 1024:.1f} KiB bf16"),
        ("KV cache / token, MHA same heads", f"{s['mha_cache_elements_per_token']:,} elements",
         f"{s['mha_cache_bytes_per_token'] / 1024:.1f} KiB bf16"),
        ("KV cache / token, transformers", f"{s['transformers_cache_elements_per_token']:,} elements",
         f"{s['transformers_cache_bytes_per_token'] / 1024:.1f} KiB bf16"),
    ]
    if context is not None:  # one sequence of `context` tokens, bf16
        r, gib = s["cache_at_context"], 2 ** 30
        rows += [(f"KV cache at {context:,} tokens, MLA latent", f"{r['latent_bytes']:,} bytes",
                  f"{r['latent_bytes'] / gib:.2f} GiB bf16"),
                 (f"KV cache at {context:,} tokens, MHA same heads", f"{r['mha_bytes']:,} bytes",
                  f"{r['mha_bytes'] / gib:.1f} GiB bf16, {r['mha_over_latent']:.1f}x")]
    width = max(len(r[0]) for r in rows)
    for label, exact, short in rows:
        print(f"  {label:<{width}}  {exact:>28}  ({short})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), whose usage errors are said once under torchrun, like
    report_error's: every rank parses the same command line."""

    def error(self, message: str):
        if not on_rank0():
            defer_to_rank0()
            message = f"rank {os.environ['RANK']}: {message}"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import PRESETS

    parser = _Parser(prog="nanoseek", description="DeepSeek-V3 / R1 in PyTorch")
    parser.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter counts and KV-cache size of a preset or checkpoint",
                          description="Parameter counts (total, MTP, activated per token) and the KV cache per token "
                                      "(MLA's latent against an MHA cache of the same heads) of a preset or of a "
                                      "checkpoint's config.json.")
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a built-in architecture")
    source.add_argument("--checkpoint", metavar="DIR", help="a Hugging Face checkpoint directory (config.json)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--context", type=int, metavar="N",
                      help="also the KV cache of one N-token sequence (e.g. 131072), latent vs MHA")
    info.set_defaults(func=cmd_info)
    for register in _subcommand_registrars():
        register(sub)
    parser.subcommands = sub.choices  # each subcommand's parser reports its own unrecognized arguments
    return parser


def _subcommand_registrars():
    """Each feature area adds its own subcommands (``register(subparsers)``) from its own module."""
    registrars = []
    # one line per feature area, e.g.:  from .train.cli import register as train; registrars.append(train)
    from .train.cli import register as train; registrars.append(train)  # noqa: E702
    from .inference.cli import register as inference; registrars.append(inference)  # noqa: E702  generate, chat, convert
    from .train.extend import register as extend; registrars.append(extend)  # noqa: E702  context extension (YaRN)
    from .eval_long import register as eval_long; registrars.append(eval_long)  # noqa: E702  long-context evaluation
    return registrars


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports the feature modules, torch among them: seconds
        args, unknown = parser.parse_known_args(argv)
    except KeyboardInterrupt:
        return _interrupted(None)
    if unknown:  # "nanoseek train: error: ...", with the subcommand's usage
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except KeyboardInterrupt:  # Ctrl-C before a command handles it itself (while importing or loading)
        return _interrupted(args.command)
    except (ValueError, FileNotFoundError, OSError) as e:  # bad input: one line, no stack trace
        report_error(args.command, e)
        return 2


def _interrupted(command: str | None) -> int:
    """``nanoseek [COMMAND]: interrupted`` on stderr (once under torchrun, where every rank is interrupted), and
    the shell's status for SIGINT."""
    if on_rank0():
        print(f"\nnanoseek{' ' + command if command else ''}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
