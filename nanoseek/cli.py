"""The ``nanoseek`` command line: ``nanoseek info``, with more subcommands added as features land."""

from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS, ModelConfig
from .errors import on_rank0, report_error


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


def cmd_info(args: argparse.Namespace) -> int:
    if args.checkpoint:
        try:
            config = ModelConfig.from_hf(args.checkpoint)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{args.checkpoint}: {e}") from None
        name = args.checkpoint
    else:
        config = ModelConfig.preset(args.preset)
        name = args.preset
    s = model_summary(config)
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
          f"{c.num_nextn_predict_layers} MTP module(s)")
    rows = [
        ("total parameters (main model)", f"{s['total_params']:,}", _human(s["total_params"])),
        ("MTP parameters (unique)", f"{s['mtp_params']:,}", _human(s["mtp_params"])),
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 / R1 in PyTorch")
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
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # "nanoseek train: error: ...", with the subcommand's usage
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except KeyboardInterrupt:  # Ctrl-C before a command handles it itself (while importing or loading)
        if on_rank0():  # under torchrun every rank is interrupted
            print(f"\nnanoseek {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:  # bad input: one line, no stack trace
        report_error(args.command, e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
