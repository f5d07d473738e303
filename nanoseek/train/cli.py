"""`nanoseek train`, `nanoseek report` and `nanoseek demo`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import on_rank0, report_error
from .config import BALANCE_MODES, DEMO, DTYPES, OPTIMIZER_STATES, TrainConfig, flag_name

# (flag, TrainConfig field, type, help); every default is None so that only the flags given override.
_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--steps", "steps", int, "optimizer steps (default 360)"),
    ("--batch-size", "batch_size", int, "sequences per micro-batch (default 16)"),
    ("--seq-len", "seq_len", int, "tokens per sequence (default 256)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (default 1)"),
    ("--batch-warmup-start", "batch_warmup_start", int,
     "batch-size warmup: sequences in the first step, a multiple of --batch-size; the step grows linearly to "
     "--batch-size x --grad-accum over --batch-warmup-tokens (V3: 3072 of 15360; default: no warmup)"),
    ("--batch-warmup-tokens", "batch_warmup_tokens", "count",
     "tokens over which the batch-size warmup grows the step, e.g. 2e6 (V3: 469e9)"),
    ("--lr", "lr", float, "peak learning rate (default 3e-3)"),
    ("--min-lr-ratio", "min_lr_ratio", float, "cosine decays to lr x this (default 0.1)"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps (default 30)"),
    ("--decay-start", "decay_start", float, "fraction of the steps where the cosine decay starts (default 0.5)"),
    ("--decay-end", "decay_end", float,
     "fraction of the steps where the cosine reaches lr x min-lr-ratio, held after (default 1: the last step)"),
    ("--final-start", "final_start", float,
     "fraction of the steps from which a last constant tail runs at lr x --final-lr-ratio (V3: 0.989)"),
    ("--final-lr-ratio", "final_lr_ratio", float, "the last tail's learning rate over lr (V3: 7.3e-6 / 2.2e-4)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0.1)"),
    ("--grad-clip", "grad_clip", float, "gradient-norm clip, 0 for none (default 1.0)"),
    ("--init-from", "init_from", str,
     "a run directory or checkpoint whose weights start this run (same architecture; RoPE scaling may differ)"),
    ("--mtp-depth", "mtp_depth", int, "MTP modules D (default: the preset's)"),
    ("--mtp-lambda", "mtp_lambda", float, "MTP loss weight (default 0.3)"),
    ("--mtp-lambda-later", "mtp_lambda_later", float, "MTP loss weight after the switch (default 0.1)"),
    ("--mtp-lambda-switch", "mtp_lambda_switch", float, "fraction of the steps where lambda switches (default 0.68)"),
    ("--balance", "balance", str, "bias: loss-free bias + sequence-wise loss (V3); aux: balance loss only; none"),
    ("--balance-alpha", "balance_alpha", float,
     "balance-loss weight (default: 1e-4 with bias, 0.01 with aux, 0 with none)"),
    ("--bias-gamma", "bias_gamma", float, "bias update speed (default 0.001)"),
    ("--bias-gamma-later", "bias_gamma_later", float, "bias speed after the switch (default 0)"),
    ("--bias-gamma-switch", "bias_gamma_switch", float, "fraction of the steps where gamma switches (default 0.97)"),
    ("--dtype", "dtype", str,
     "bf16: autocast, fp32 weights (default); bf16-weights: bf16 weights and gradients, fp32 master copies; fp32; "
     "fp8: DeepSeek-V3's FP8 products of the linear layers, emulated (e4m3 with 1 x 128 tiles and 128 x 128 weight "
     "blocks; slower than fp32: for studying FP8 training)"),
    ("--optimizer-states", "optimizer_states", str,
     "AdamW's moments with --dtype bf16-weights: fp32 (default) or bf16, as DeepSeek-V3 keeps them (4 bytes per "
     "parameter less, a faster step)"),
    ("--device", "device", str, "cpu, cuda, cuda:1 (default: cuda if available)"),
    ("--seed", "seed", int, "seed of the initialization and the data order (default 0)"),
    ("--threads", "threads", int, "torch intra-op threads (default: torch's)"),
    ("--eval-every", "eval_every", int, "validation every N steps (default 60)"),
    ("--eval-batches", "eval_batches", int, "validation batches (default 8)"),
    ("--save-every", "save_every", int, "checkpoint every N steps (default 60)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept (default 1)"),
    ("--log-every", "log_every", int, "metrics.jsonl record every N steps (default 1)"),
    ("--time-budget", "time_budget", float,
     "minutes of training, then stop gracefully with a checkpoint (0: none, to resume a budgeted run without one)"),
    ("--max-bad-steps", "max_bad_steps", int, "consecutive NaN/inf steps before stopping (default 3)"),
    ("--data", "data", str, "files, directories, globs, *.jsonl, hf:NAME[:CONFIG][:SPLIT] (default: the stdlib)"),
    ("--text-field", "text_field", str, "JSONL / dataset text field (default text)"),
    ("--val-fraction", "val_fraction", float, "fraction of documents held out (default 0.05)"),
    ("--max-corpus-mb", "max_corpus_mb", float,
     "train on at most this many million characters (a deterministic subset of the documents)"),
    ("--tokenizer", "tokenizer", str, "a tokenizer.json (or its directory) instead of training one"),
    ("--vocab-size", "vocab_size", int, "vocabulary of the trained tokenizer (default 8192)"),
    ("--cache-dir", "cache_dir", str, "tokenizer and token cache (default $NANOSEEK_CACHE or ~/.cache/nanoseek)"),
    ("--sample-prompt", "sample_prompt", str, "prompt of the report's sample"),
    ("--sample-tokens", "sample_tokens", int, "tokens of the report's sample"),
]
_FLAGS = [("--compile", "compile", "torch.compile the model"),
          ("--activation-checkpointing", "activation_checkpointing", "recompute activations in the backward pass"),
          ("--decay-embeddings", "decay_embeddings", "weight decay on the embedding too"),
          ("--decay-norms-and-biases", "decay_norms_and_biases", "weight decay on norms and biases too")]


def _model_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--model takes KEY=VALUE (a ModelConfig field), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _count(text: str) -> int:
    """A whole number, also written as 2e6."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens such as 2000000 or 2e6, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}")
    return int(value)


def _demo_help(dest: str, help_: str) -> str:
    """A training option's help under `nanoseek demo`, with the demo's own default where it differs."""
    if dest not in DEMO:
        return help_
    default = "760, lowered to fit --time-budget" if dest == "steps" else f"{DEMO[dest]:g}"
    return re.sub(r" ?\(default [^)]*\)", "", help_) + f" (default {default})"


def _add_train_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument("--preset", help="model preset (default demo)")
    p.add_argument("--model", action="append", type=_model_override, metavar="KEY=VALUE",
                   help="override a ModelConfig field of the preset, e.g. --model hidden_size=192 (repeatable)")
    for flag, dest, typ, help_ in _OPTIONS:
        help_ = _demo_help(dest, help_) if demo else help_
        kw: dict[str, Any] = dict(dest=dest, type=_count if typ == "count" else typ, default=None, help=help_)
        if dest == "data":
            kw.update(nargs="+", action="extend", metavar="SPEC")
        elif dest == "balance":
            kw.update(choices=BALANCE_MODES)
        elif dest == "dtype":
            kw.update(choices=DTYPES)
        elif dest == "optimizer_states":
            kw.update(choices=OPTIMIZER_STATES)
        names = [flag] + (["--aux-alpha"] if dest == "balance_alpha" else [])
        p.add_argument(*names, **kw)
    # --X / --no-X: a resumed run keeps the setting it started with unless one of them is given
    for flag, dest, help_ in _FLAGS:
        p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_)
    p.add_argument("--report", dest="report", action=argparse.BooleanOptionalAction, default=None,
                   help="write the report at the end (default)")
    p.add_argument("--progress", dest="progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default)")


def _check_conflicts(given: dict[str, Any], args: argparse.Namespace) -> None:
    """Flags given together that contradict each other: one line each, rather than one of them ignored."""
    balance, depth = given.get("balance"), given.get("mtp_depth")
    if balance == "none" and given.get("balance_alpha"):
        raise ValueError("--balance none trains without balancing: leave out --balance-alpha (or use --balance aux "
                         "for the balance loss alone)")
    gamma = [f for f in ("bias_gamma", "bias_gamma_later") if given.get(f)]
    if balance in ("aux", "none") and gamma:
        raise ValueError(f"--balance {balance} has no routing bias to update: leave out {flag_name(gamma[0])}")
    lam = [f for f in ("mtp_lambda", "mtp_lambda_later") if given.get(f)]
    if depth == 0 and lam:
        raise ValueError(f"--mtp-depth 0 has no MTP loss: leave out {flag_name(lam[0])}")
    if "vocab_size" in given and given.get("tokenizer"):
        raise ValueError("--vocab-size sizes a tokenizer trained here; with --tokenizer the vocabulary is the given "
                         "tokenizer's: leave out one of them")
    if "vocab_size" in given and given.get("init_from") and not given.get("tokenizer") \
            and (Path(given["init_from"]) / "tokenizer.json").is_file():
        raise ValueError("--init-from trains with its source's tokenizer (its weights mean its token ids): leave out "
                         "--vocab-size")
    if getattr(args, "resume", None) and getattr(args, "overwrite", False):
        raise ValueError("--resume continues a run and --overwrite starts one over: give one of them")


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields set on the command line."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    _check_conflicts(out, args)
    if out.get("data"):  # files and directories by absolute path, so a run resumes from any directory
        out["data"] = [_absolute_data_path(spec) for spec in out["data"]]
        if any(not os.path.isabs(os.path.expanduser(spec)) and not spec.startswith("hf:") for spec in out["data"]):
            out["data_root"] = os.getcwd()  # relative globs: matched from here on every resume too
    if out.get("cache_dir"):  # as --data: the same cache whatever directory the run resumes from
        out["cache_dir"] = os.path.abspath(os.path.expanduser(out["cache_dir"]))
    if out.get("time_budget") == 0:  # --time-budget 0: none (a resumed run then trains to its --steps)
        out["time_budget"] = None
    if getattr(args, "model", None):
        out["model_overrides"] = dict(args.model)
    return out


def _absolute_data_path(spec: str) -> str:
    """A --data file or directory as an absolute path (its documents' ids, hence the split, depend only on its
    name); globs and hf: datasets as given."""
    import glob

    path = os.path.expanduser(spec)
    if spec.startswith("hf:") or glob.has_magic(spec) or not os.path.exists(path):
        return spec
    return os.path.abspath(path)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train a model (every DeepSeek-V3 objective), resumable",
        description="Train a DeepSeek-V3-style model. Without --data: the Python standard library of this "
                    "interpreter; without --tokenizer: a byte-level BPE trained on the training split.")
    train.add_argument("--out", help="run directory (default runs/PRESET)")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly where it stopped")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    _add_train_options(train)
    par = train.add_argument_group(
        "parallelism", "run under torchrun, e.g. torchrun --nproc-per-node 4 -m nanoseek train --ep 2 --dp 2; "
        "EP x PP x DP must equal the number of processes")
    par.add_argument("--ep", type=int, help="expert-parallel ranks: the routed experts are split over them (default 1)")
    par.add_argument("--pp", type=int, help="pipeline-parallel ranks (default 1)")
    par.add_argument("--dp", type=int, help="data-parallel ranks, optimizer state sharded over them (ZeRO-1; default 1)")
    par.add_argument("--pp-schedule", choices=("dualpipev", "1f1b", "interleaved-zb", "zbv"),
                     help="pipeline schedule (default dualpipev)")
    par.add_argument("--microbatches", type=int,
                     help="pipeline micro-batches per --grad-accum micro-batch: a step runs this x --grad-accum "
                          "(default: the fewest the schedule accepts)")
    par.add_argument("--dist-timeout", type=float, default=300.0,
                     help="seconds before a collective that waits on a dead or hung rank fails the job (default 300)")
    train.set_defaults(func=cmd_train)

    report = subparsers.add_parser(
        "report", help="write a training run's report (Markdown + PNG plots + sample)",
        description="Write RUN_DIR/report.md from the run's metrics.jsonl: losses against the unigram baseline, "
                    "validation perplexity, MTP loss, expert load and MaxVio, with PNG plots under RUN_DIR/plots "
                    "and a generated sample. Prints the report's path.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of nanoseek train (or demo)")
    report.add_argument("--no-sample", action="store_true", help="no generated sample")
    report.add_argument("--prompt", help="prompt of the sample (default: the run's)")
    report.add_argument("--max-new-tokens", type=int, help="tokens of the sample (default: the run's)")
    report.set_defaults(func=cmd_report)

    demo = subparsers.add_parser(
        "demo", help="train the CPU demo on the standard library (~10 min), report, complete a Python prompt",
        description="Train (or continue) the demo run, write its report, and complete a Python prompt. The "
                    "training options below default to the demo's where it differs from `nanoseek train`: "
                    "--steps 760 fitted to --time-budget 8.5 (minutes), --bias-gamma 0.01.")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--prompt", default="import os\n\n\ndef", help="the prompt to complete (default "
                      "'import os\\n\\n\\ndef')")
    demo.add_argument("--max-new-tokens", type=int, default=96, help="tokens of the completion (default 96)")
    _add_train_options(demo, demo=True)
    demo.set_defaults(func=cmd_demo)


def _parallel_settings(args: argparse.Namespace):
    """The distributed layout asked for (flags or torchrun's WORLD_SIZE), or None for one process."""
    from ..distributed.train import wants_distributed

    if not hasattr(args, "dist_timeout"):  # nanoseek demo: one process
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("nanoseek demo runs in one process; under torchrun use nanoseek train with "
                             "--ep / --pp / --dp")
        return None
    ep, pp, dp = getattr(args, "ep", None), getattr(args, "pp", None), getattr(args, "dp", None)
    for name, value in (("ep", ep), ("pp", pp), ("dp", dp), ("microbatches", args.microbatches)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout must be positive (seconds), got {args.dist_timeout}")
    if (args.microbatches is not None or args.pp_schedule is not None) and (pp or 1) < 2:
        raise ValueError("--microbatches and --pp-schedule set up a pipeline: give --pp 2 or more")
    if not wants_distributed(ep, pp, dp):
        return None
    from ..distributed.mesh import Layout
    from ..distributed.train import ParallelSettings

    layout = Layout(ep=ep or 1, pp=pp or 1, dp=dp or 1)
    layout.validate(int(os.environ.get("WORLD_SIZE", "1")))
    return ParallelSettings(layout, args.pp_schedule or "dualpipev", args.microbatches, args.dist_timeout)


def _train(args: argparse.Namespace, cmd: str, cfg: TrainConfig, out: Path, resume: bool, overwrite: bool) -> int | None:
    from .loop import TrainingError, train

    parallel = None
    try:
        parallel = _parallel_settings(args)
        if parallel is not None:
            from ..distributed.train import train_distributed

            result = train_distributed(cfg, out, parallel, resume=resume, overwrite=overwrite)
            return None if result is not None else 0  # ranks other than 0 stop here (no report)
        train(cfg, out, resume=resume, overwrite=overwrite)
    except TrainingError as e:
        report_error(cmd, e)
        return 1
    except KeyboardInterrupt as e:
        from .checkpoint import current_checkpoint
        from .loop import StartInterrupted

        try:
            saved = current_checkpoint(out) is not None
        except ValueError:  # a dangling pointer: resuming will say what is wrong
            saved = True
        if isinstance(e, StartInterrupted):
            how = f"it stopped before its first checkpoint and left {out} as it was; run the same command again"
        elif not saved:
            how = "it stopped before its first checkpoint; run the same command again to start over"
        else:
            how = "continue with: " + ("nanoseek demo" if cmd == "demo" else f"nanoseek train --resume {out}")
            if parallel is not None:  # under torchrun the layout must be given again
                from ..distributed.train import layout_flags

                how += f" {layout_flags(parallel.layout)} (under torchrun, as before)"
        if on_rank0():  # under torchrun every rank is interrupted
            print(f"\nnanoseek {cmd}: interrupted; {how}", file=sys.stderr)
        return 130
    return None


def cmd_train(args: argparse.Namespace) -> int:
    from .loop import resume_config

    settings = given_settings(args)
    if args.resume:
        out = Path(args.resume)
        if args.out and Path(args.out).resolve() != out.resolve():
            raise ValueError("--out and --resume name different directories; --resume DIR continues DIR")
        cfg = resume_config(out, settings)
        code = _train(args, "train", cfg, out, resume=True, overwrite=False)
    else:
        cfg = TrainConfig(**settings)
        out = Path(args.out or f"runs/{cfg.preset}")
        code = _train(args, "train", cfg, out, resume=False, overwrite=args.overwrite)
    if code is not None:
        return code
    if cfg.report:
        _report(out)
    return 0


def _report(out: Path, announce: bool = True, **kw) -> Path:
    from .report import write_report

    path = write_report(out, log=lambda s: print(s, file=sys.stderr), **kw)
    if announce:
        print(f"report: {path}", file=sys.stderr)
    return path


def cmd_report(args: argparse.Namespace) -> int:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    path = _report(Path(args.run_dir), announce=False, sample=not args.no_sample, prompt=args.prompt,
                   max_new_tokens=args.max_new_tokens)
    print(path)  # on stdout, once: for scripts
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .checkpoint import current_checkpoint
    from .loop import resume_config

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    out = Path(args.out)
    settings = given_settings(args)
    resume = out.is_dir() and current_checkpoint(out) is not None
    if resume:
        print(f"nanoseek demo: continuing the run in {out}", file=sys.stderr)
        cfg = resume_config(out, settings)
    else:
        cfg = TrainConfig.demo(**settings)
    code = _train(args, "demo", cfg, out, resume=resume, overwrite=False)
    if code is not None:
        return code
    _report(out, sample=True)
    from .report import _sample

    info = _sample(out, cfg.to_dict(), args.prompt, args.max_new_tokens, log=lambda s: print(s, file=sys.stderr))
    if info:
        print(f"\n--- completion ({info['method']}, {info['tokens']} tokens"
              + (f", MTP acceptance {info['acceptance_rate']:.0%}" if info.get("acceptance_rate") is not None else "")
              + ") ---")
        print(info["prompt"] + info["completion"])
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("val_loss") is not None and summary.get("unigram_val_loss") is not None:
        print(f"\nvalidation loss {summary['val_loss']:.3f} nats/token vs {summary['unigram_val_loss']:.3f} for a "
              f"unigram model of the same tokenizer; report: {out / 'report.md'}")
    return 0
