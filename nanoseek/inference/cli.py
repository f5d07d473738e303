"""``nanoseek generate``, ``nanoseek chat`` and ``nanoseek convert``.

    nanoseek generate --checkpoint DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P]
                      [--top-k K] [--seed S] [--speculative | --no-speculative] [--compile] [--chat | --raw]
                      [--system TEXT] [--dtype auto|bf16|fp16|fp32] [--device DEV] [--threads N]
    nanoseek chat     --checkpoint DIR [same sampling / model options] [--system TEXT]
    nanoseek convert  SRC DST [--dtype bf16|fp16|fp32] [--no-progress]

``generate`` streams the new text to stdout as it is produced (the exact model output: an R1 reply starts
inside its ``<think>`` block and shows ``</think>`` where the reasoning ends) and prints one summary line
(tokens, prefill / decode tokens/s, MTP acceptance rate) on stderr, so stdout can be piped. ``--prompt -``
reads the prompt from stdin. With ``--chat`` (the default when the checkpoint has a chat template) the prompt
is one user turn rendered with the checkpoint's template; ``--raw`` feeds bos + the text as is.

``chat`` is a multi-turn conversation on stdin/stdout. The reasoning part of a reply is shown dim (ANSI) on a
terminal, and between ``[think]`` and ``[/think]`` markers otherwise (or with NO_COLOR set); the history keeps
only the text after ``</think>`` (the template drops the rest). ``/reset`` starts over, ``/exit`` (or
end of input) quits.

Sampling defaults come from the checkpoint's ``generation_config.json``, as in transformers' ``generate``: when
it sets ``do_sample: true``, the temperature, top-p and top-k that the command line leaves out are its own
(transformers' defaults for what it lacks: temperature 1.0, top-k 50), and one stderr line says which; without
the file, or when it does not sample, decoding is greedy. Its ``eos_token_id`` ids also stop generation.

Bad input (empty prompt, prompt past the model's context, bad sampling parameters, a checkpoint directory
that is missing or lacks tokenizer.json or tokenizer_config.json, a malformed generation_config.json) is one
``nanoseek CMD: error: ...`` line on stderr and exit status 2.
Asking a model without MTP module for speculative decoding warns and decodes plainly.
:func:`validate_sampling` holds the sampling-parameter checks for other callers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from .generation_config import GENERATION_CONFIG_FILE, HF_DEFAULT_TEMPERATURE, HF_DEFAULT_TOP_K, read_generation_config

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# -------------------------------------------------------------------------- validation (reusable)
def validate_sampling(*, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                      max_new_tokens: int | None = None) -> None:
    """Raise ``ValueError`` with one line naming the first invalid sampling parameter.

    temperature: a finite number >= 0 (0 = greedy); top_k: None or an integer >= 1; top_p: None or a number in
    (0, 1] (checked by :func:`nanoseek.inference.sampling.check_sampling`); max_new_tokens: None (not
    checked) or an integer >= 1.
    """
    from .sampling import check_sampling  # (imports torch: kept out of the CLI's start-up)

    check_sampling(temperature, top_k, top_p)
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def check_prompt_length(n_prompt: int, max_new_tokens: int, context: int) -> int:
    """The number of new tokens that fit: ``max_new_tokens`` or what is left of the model's ``context``
    (max_position_embeddings). Raises ``ValueError`` for an empty prompt or one that leaves no room."""
    if n_prompt == 0:
        raise ValueError("the prompt is empty")
    if n_prompt >= context:
        raise ValueError(f"the prompt is {n_prompt} tokens, which leaves no room in the model's context of "
                         f"{context} tokens (max_position_embeddings)")
    return min(max_new_tokens, context - n_prompt)


# -------------------------------------------------------------------------- argument parsing
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="checkpoint directory (config.json, safetensors, tokenizer.json, tokenizer_config.json)")
    p.add_argument("--max-new-tokens", type=_int, default=max_new_tokens, metavar="N",
                   help=f"at most N new tokens per reply (default {max_new_tokens})")
    # None: not given, resolved from the checkpoint's generation_config.json (see _resolve_sampling)
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="sampling temperature; 0 = greedy. Default: the checkpoint's generation_config.json when it "
                        "sets do_sample (DeepSeek-V3 / R1: 0.6 with top-p 0.95), else 0 (greedy)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: keep mass P, in (0, 1]. Default: generation_config.json's top_p when it "
                        "samples, else none")
    p.add_argument("--top-k", type=_int, default=None, metavar="K",
                   help="keep the K most likely tokens. Default: generation_config.json's top_k when it samples "
                        "(50, transformers' default, when it sets none), else none")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for sampling (chat: turn i uses SEED + i)")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=False,
                   help="MTP self-speculative decoding (needs a checkpoint with an MTP module; default off)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding steps: several times faster per token after the first steps "
                        "of each shape compile (seconds each); pays off for long generations")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt (chat template only)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights dtype (default: the checkpoint's; bf16 for FP8 checkpoints)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=_int, default=None, metavar="N",
                   help="torch intra-op threads on the CPU (default: torch's). Decoding a small model runs many "
                        "tiny operations, which can be faster on 1 thread than on many")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``generate``, ``chat`` and ``convert`` to the ``nanoseek`` command line."""
    gen = subparsers.add_parser(
        "generate", help="stream a completion of a prompt",
        description="Stream the model's continuation of a prompt to stdout; a summary line goes to stderr.")
    _add_model_args(gen, max_new_tokens=256)
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt ('-' reads it from stdin)")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="mode", action="store_const", const="chat",
                      help="render the prompt as a user turn with the chat template (default when there is one)")
    mode.add_argument("--raw", dest="mode", action="store_const", const="raw",
                      help="feed bos + the prompt text as is")
    gen.set_defaults(func=cmd_generate, mode=None)

    chat = subparsers.add_parser(
        "chat", help="interactive multi-turn chat (/reset, /exit)",
        description="Chat on stdin/stdout with the checkpoint's chat template. /reset clears the conversation, "
                    "/exit quits.")
    _add_model_args(chat, max_new_tokens=2048)
    chat.set_defaults(func=cmd_chat)

    conv = subparsers.add_parser(
        "convert", help="dequantize an FP8 checkpoint to bf16 (shard by shard, on the CPU)",
        description="Turn an FP8 block-quantized checkpoint into a bf16 (or fp16 / fp32) one, one shard at a "
                    "time; DST is written next to itself and renamed into place when complete.")
    conv.add_argument("src", metavar="SRC", help="FP8 checkpoint directory")
    conv.add_argument("dst", metavar="DST", help="new checkpoint directory (must not exist)")
    conv.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                      help="dtype of the dequantized weights (default bf16)")
    conv.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    conv.set_defaults(func=cmd_convert, progress=True)


# -------------------------------------------------------------------------- loading
def _warn(command: str, message: str) -> None:
    print(f"nanoseek {command}: warning: {message}", file=sys.stderr)


def load_for_inference(args: argparse.Namespace):
    """Validate the options, then load (tokenizer, model) from ``args.checkpoint``; warnings become one line."""
    import torch

    from ..allocator import keep_freed_memory
    from ..devices import pick_device
    from ..hf import load_pretrained
    from ..tokenizer import TOKENIZER_CONFIG_FILE, Tokenizer, TokenizerError

    validate_sampling(temperature=0.0 if args.temperature is None else args.temperature, top_k=args.top_k,
                      top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    path = Path(args.checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint path {path} is not a directory")
    _apply_generation_config(args, path)
    tokenizer = Tokenizer.from_pretrained(path)  # before the (large) model: fail fast without tokenizer files
    if not (path / TOKENIZER_CONFIG_FILE).is_file():  # the tokenizer loads without it, but then no bos is added
        raise TokenizerError(f"{path} has no {TOKENIZER_CONFIG_FILE} (the bos and eos tokens, the chat template): copy "
                             "it from the checkpoint's model next to its tokenizer.json")
    device = pick_device(args.device)
    keep_freed_memory(device)  # prefill reuses its chunk buffers instead of faulting them in (1.35x here)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = None if args.dtype == "auto" else getattr(torch, _DTYPES[args.dtype])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_pretrained(path, dtype=dtype, device=device)
    for w in caught:
        _warn(args.command, str(w.message).splitlines()[0])
    model.eval()
    if args.speculative and len(getattr(model, "mtp", ())) == 0:
        _warn(args.command, "the checkpoint has no MTP module: speculative decoding is off, decoding plainly")
        args.speculative = False
    return tokenizer, model


def _apply_generation_config(args: argparse.Namespace, path: Path) -> None:
    """Complete the sampling options and the stop tokens (``args.extra_stop_tokens``) from the checkpoint's
    generation_config.json, saying on stderr which settings came from it, and warn about --top-p / --top-k
    given for greedy decoding."""
    generation_config = read_generation_config(path)
    given_temperature, given_filters = args.temperature is not None, args.top_k is not None or args.top_p is not None
    used = _resolve_sampling(args, generation_config.sampling)
    if used:
        hint = "" if given_temperature else "; --temperature 0 for greedy"
        print(f"nanoseek {args.command}: sampling settings from {GENERATION_CONFIG_FILE}: {', '.join(used)}{hint}",
              file=sys.stderr)
    if args.temperature == 0 and given_filters:
        greedy = "--temperature 0" if given_temperature else "--temperature 0, the default"
        _warn(args.command, f"--top-p / --top-k apply to sampling only: greedy decoding ({greedy}) ignores them")
    args.extra_stop_tokens = generation_config.eos_token_ids


def _resolve_sampling(args: argparse.Namespace, sampling: dict[str, Any] | None) -> list[str]:
    """Set the sampling options the command line left unset (None) from generation_config.json's ``sampling``
    (None: the file does not sample, so decoding is greedy), as transformers' generate would. Returns the
    settings taken from the file, described ("top-p 0.95")."""
    if sampling is None:
        if args.temperature is None:
            args.temperature = 0.0
        return []
    used = []
    if args.temperature is None:
        args.temperature = sampling.get("temperature", HF_DEFAULT_TEMPERATURE)
        used.append(f"temperature {args.temperature:g}" + _hf_default("temperature", sampling))
    if args.temperature == 0:  # greedy (--temperature 0): the file's top-p / top-k would do nothing
        return used
    top_p, top_k = sampling.get("top_p", 1.0), sampling.get("top_k", HF_DEFAULT_TOP_K)
    if args.top_p is None and top_p < 1.0:  # 1.0: no nucleus
        args.top_p = top_p
        used.append(f"top-p {top_p:g}")
    if args.top_k is None and top_k > 0:  # 0: no top-k
        args.top_k = top_k
        used.append(f"top-k {top_k}" + _hf_default("top_k", sampling))
    return used


def _hf_default(name: str, sampling: dict[str, Any]) -> str:
    return "" if name in sampling else " (transformers' default)"


def _core_generate() -> Callable:
    """``nanoseek.inference.generate``, imported when a command runs (``nanoseek info`` does not need it)."""
    from . import generate

    return generate


def _stop_tokens(tokenizer, model, extra: Iterable[int] = ()) -> tuple[int, ...]:
    """The tokenizer's and the model config's eos tokens, then ``extra`` ones (generation_config.json's)."""
    stops: list[int] = []
    for t in (tokenizer.eos_token_id, model.config.eos_token_id, list(extra)):
        for i in (t if isinstance(t, (list, tuple)) else [t]):
            if isinstance(i, int) and i not in stops:
                stops.append(i)
    return tuple(stops)


def _check_vocab(ids: list[int], model) -> None:
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}: the tokenizer files do "
                         "not belong to this checkpoint")


# -------------------------------------------------------------------------- streaming
def _stat(stats: Any, name: str) -> Any:
    """A field of GenerationResult.stats (a GenerationStats, or a dict), None when absent."""
    return stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)


def format_summary(stats: Any, n_prompt: int, n_new: int, speculative: bool) -> str:
    """One line: token counts, prefill / decode speed, MTP acceptance rate, latent cache size."""
    parts = [f"{n_prompt} prompt + {n_new} new tokens"]
    for label, name in (("prefill", "prefill_tokens_per_s"), ("decode", "decode_tokens_per_s")):
        value = _stat(stats, name)
        if name == "decode_tokens_per_s" and n_new <= 1:
            parts.append(f"{label} n/a (no token after the first)")
        elif value is not None:
            parts.append(f"{label} {value:.1f} tok/s")
    if _stat(stats, "compiled"):
        parts.append(f"first step {_stat(stats, 'first_step_s'):.1f} s (compiled, not in the decode rate)")
    rate = _stat(stats, "acceptance_rate")
    if speculative and _stat(stats, "drafted") == 0:
        parts.append("MTP acceptance n/a (nothing drafted)")
    elif speculative and rate is not None:
        drafted, accepted = _stat(stats, "drafted"), _stat(stats, "accepted")
        detail = f" ({accepted}/{drafted} drafts)" if drafted is not None and accepted is not None else ""
        parts.append(f"MTP acceptance {100 * rate:.1f}%{detail}")
    else:
        parts.append("MTP acceptance n/a (not speculative)")
    cache = _stat(stats, "cache_bytes")
    if cache is not None:
        parts.append(f"cache {cache / 2**20:.2f} MiB")
    return "[nanoseek] " + " | ".join(parts)


class ThinkDisplay:
    """Writes a streamed reply, marking its reasoning: dim ANSI on a terminal, ``[think]`` ... ``[/think]``
    otherwise. The ``<think>`` / ``</think>`` tags themselves are replaced by the markers; a tag split across
    chunks is held back until it is complete."""

    def __init__(self, out: TextIO, *, color: bool, thinking: bool = False):
        self.out = out
        self.color = color
        self.thinking = False
        self._pending = ""
        if thinking:
            self._enter()

    def _enter(self) -> None:
        self.thinking = True
        self.out.write("\x1b[2m" if self.color else "[think]")

    def _leave(self) -> None:
        self.thinking = False
        self.out.write("\x1b[0m" if self.color else "[/think]")

    def write(self, text: str) -> None:
        text = self._pending + text
        self._pending = ""
        while text:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            i = text.find(tag)
            if i >= 0:
                self.out.write(text[:i])
                text = text[i + len(tag):]
                self._leave() if self.thinking else self._enter()
                continue
            keep = _partial_suffix(text, tag)  # the start of a tag cut by the chunk boundary
            self.out.write(text[:len(text) - keep])
            self._pending = text[len(text) - keep:]
            break
        self.out.flush()

    def close(self) -> None:
        if self._pending:
            self.out.write(self._pending)
            self._pending = ""
        if self.thinking:  # a reply that ended (or was cut off) inside its reasoning
            self._leave()
        self.out.flush()


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def stream_generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, args: argparse.Namespace,
                    write: Callable[[str], None], seed: int | None = None) -> tuple[str, list[int], Any]:
    """Run the inference core on one prompt, writing decoded text through ``write`` as tokens are accepted.
    Returns (reply text, reply ids without stop tokens, stats)."""
    generate = _core_generate()
    stops = _stop_tokens(tokenizer, model, getattr(args, "extra_stop_tokens", ()))
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    state = {"done": False, "streamed": False}

    def accept(ids: Iterable[int]) -> None:
        kept = []
        for i in ids:
            i = int(i)
            if state["done"]:
                break
            if i in stops:
                state["done"] = True
                break
            kept.append(i)
        if kept:
            text = decoder.push(kept)
            if text:
                write(text)

    def on_tokens(new: list[list[int]]) -> None:
        state["streamed"] = True
        accept(new[0])

    result = generate(model, [prompt_ids], max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, stop_tokens=stops, seed=seed, speculative=args.speculative,
                      compile=getattr(args, "compile", False), on_tokens=on_tokens)
    if not state["streamed"]:  # a core that returned without streaming: print the result at once
        accept(result.tokens[0])
    tail = decoder.flush()
    if tail:
        write(tail)
    text = tokenizer.decode(decoder.ids, skip_special_tokens=True)
    return text, list(decoder.ids), result.stats


def _prompt_text(args: argparse.Namespace) -> str:
    """The prompt, checked before the model loads: not empty, valid UTF-8 (its own positions in the message).

    Whitespace alone is a prompt with --raw (code indentation, blank lines: text like any other), but not a chat
    turn, where it is almost always a slip (``echo | nanoseek generate --prompt -``); the chat loop skips blank
    lines alike. Without --chat or --raw the mode is known only once the tokenizer is loaded: refused there too.
    """
    from ..tokenizer import check_text

    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text:
        raise ValueError("the prompt is empty")
    if args.mode != "raw" and not text.strip():
        raise ValueError("the prompt is empty (only whitespace; --raw feeds it as it is)")
    return check_text(text)


def _safe_stdout() -> TextIO:
    out = sys.stdout
    try:
        out.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?', not a crash
    except (AttributeError, ValueError, OSError):
        pass
    return out


def _color(out: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def _fit_new_tokens(command: str, what: str, n_prompt: int, max_new_tokens: int, model) -> int:
    """:func:`check_prompt_length` in the model's context, with a warning when the context lowers
    ``max_new_tokens`` (``what``: the prompt or the conversation)."""
    context = model.config.max_position_embeddings
    max_new = check_prompt_length(n_prompt, max_new_tokens, context)
    if max_new < max_new_tokens:
        _warn(command, f"--max-new-tokens {max_new_tokens} lowered to {max_new}: {what} is {n_prompt} tokens and "
                       f"the model's context is {context}")
    return max_new


# -------------------------------------------------------------------------- commands
def cmd_generate(args: argparse.Namespace) -> int:
    text = _prompt_text(args)  # an empty prompt fails before anything is loaded
    tokenizer, model = load_for_inference(args)
    mode = args.mode or ("chat" if tokenizer.has_chat_template else "raw")
    if mode == "chat":
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        if args.system:
            _warn("generate", "--system is ignored with --raw" if args.mode == "raw" else
                  "--system is ignored: the checkpoint has no chat template, so the prompt is used as it is")
        ids = tokenizer.encode(text, add_bos=tokenizer.bos_token_id is not None)
    _check_vocab(ids, model)
    max_new = _fit_new_tokens("generate", "the prompt", len(ids), args.max_new_tokens, model)
    out = _safe_stdout()

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    try:
        reply, reply_ids, stats = stream_generate(model, tokenizer, ids, max_new, args, write, seed=args.seed)
    except KeyboardInterrupt:
        write("\n")
        print("nanoseek generate: interrupted", file=sys.stderr)
        return 130
    if not reply.endswith("\n"):
        write("\n")
    print(format_summary(stats, len(ids), len(reply_ids), args.speculative), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ..tokenizer import check_text

    tokenizer, model = load_for_inference(args)
    if not tokenizer.has_chat_template:
        raise ValueError(f"the tokenizer in {args.checkpoint} has no chat template: use `nanoseek generate --raw`")
    out = _safe_stdout()
    color = _color(out)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    print("nanoseek chat: /reset starts a new conversation, /exit quits", file=sys.stderr)
    turn = 0
    while True:
        if interactive:
            out.write("\n>>> ")
            out.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        if not line:  # end of input
            return 0
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history = list(system)
            out.write("[conversation reset]\n")
            out.flush()
            continue
        if command.startswith("/") and " " not in command:
            print(f"nanoseek chat: unknown command {command} (commands: /reset, /exit)", file=sys.stderr)
            continue
        try:
            check_text(text)  # here, not in the rendered prompt: the message names the place in this line
        except ValueError as e:
            print(f"nanoseek chat: error: {e}", file=sys.stderr)
            continue
        messages = [*history, {"role": "user", "content": text}]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            _check_vocab(ids, model)
            max_new = _fit_new_tokens("chat", "the conversation", len(ids), args.max_new_tokens, model)
        except ValueError as e:
            print(f"nanoseek chat: error: {e}; /reset starts a new conversation", file=sys.stderr)
            continue
        prompt = tokenizer.decode(ids[-8:])
        display = ThinkDisplay(out, color=color, thinking=prompt.rstrip().endswith(THINK_OPEN))
        seed = None if args.seed is None else args.seed + turn
        turn += 1
        try:
            reply, reply_ids, stats = stream_generate(model, tokenizer, ids, max_new, args, display.write, seed)
        except KeyboardInterrupt:
            display.close()
            out.write("\n[interrupted]\n")
            out.flush()
            continue
        display.close()
        out.write("\n")
        out.flush()
        print(format_summary(stats, len(ids), len(reply_ids), args.speculative), file=sys.stderr)
        history = [*messages, {"role": "assistant", "content": reply}]


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from ..convert import convert_fp8_checkpoint

    start = time.perf_counter()
    report = convert_fp8_checkpoint(args.src, args.dst, dtype=getattr(torch, _DTYPES[args.dtype]),
                                    progress=args.progress)
    print(f"nanoseek convert: {report.dequantized} FP8 weights dequantized to {args.dtype} in {report.shards} "
          f"shard(s), {report.total_bytes / 2**30:.2f} GiB written to {report.path} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0
