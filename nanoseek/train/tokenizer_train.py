"""The tokenizer: byte-level BPE trained on the training split (the `tokenizers` library), saved in DeepSeek's
tokenizer.json layout (SPEC §9): Split pre-tokenizers with DeepSeek-V3's patterns, then ByteLevel; bos
``<｜begin▁of▁sentence｜>`` id 0 and eos ``<｜end▁of▁sentence｜>`` id 1; a TemplateProcessing post-processor that
prepends bos; and a tokenizer_config.json naming them. Or any given tokenizer.json (DeepSeek-V3's own too).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import NamedTuple

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..atomic import atomic_write_json, atomic_write_text
from ..config import read_json_object

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
TOKENIZER_FORMAT = 1  # bump when the trainer below changes: invalidates cached tokenizers

# DeepSeek-V3's tokenizer.json pre-tokenizer: digits in groups of up to 3, CJK runs, then words /
# punctuation / newlines / whitespace runs (indentation stays one pre-token), then ByteLevel without regex.
_SPLITS = [
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]


class SpecialIds(NamedTuple):
    bos_id: int
    eos_id: int
    bos: str
    eos: str


def new_bpe() -> Tokenizer:
    """An untrained byte-level BPE with DeepSeek-V3's pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in _SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts, vocab_size: int) -> Tokenizer:
    """Train on an iterable of strings: ``vocab_size`` tokens in all, bos = 0 and eos = 1 first."""
    tok = new_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, 0)])
    return tok


def trained_tokenizer(docs, vocab_size: int, cache_root: Path, log=print) -> tuple[Tokenizer, str]:
    """The BPE of ``docs`` (the train split), from the cache when the same documents were trained before."""
    from .data import corpus_key

    key = hashlib.sha256(f"bpe-v{TOKENIZER_FORMAT}:{vocab_size}:{corpus_key(docs)}".encode()).hexdigest()[:32]
    path = cache_root / "tokenizers" / key / "tokenizer.json"
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
            log(f"tokenizer: byte-level BPE, {tok.get_vocab_size():,} tokens (cached {path.parent})")
            return tok, f"bpe:{vocab_size} (cached)"
        except Exception:  # a damaged cache entry: train again
            pass
    t0 = time.perf_counter()
    tok = train_bpe((d.text for d in docs), vocab_size)
    got = tok.get_vocab_size(with_added_tokens=True)
    log(f"tokenizer: trained byte-level BPE, {got:,} tokens in {time.perf_counter() - t0:.1f} s"
        + (f" (the corpus supports only {got:,} of the {vocab_size:,} asked)" if got < vocab_size else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tok.to_str())
    return tok, f"bpe:{vocab_size}"


def tokenizer_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json (or a directory holding one), with one-line errors."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:
        raise ValueError(f"{file} is not a valid tokenizer.json: {str(e).splitlines()[0] if str(e) else e}") from None
    special_ids(tok, where=file)  # must have an end-of-sentence token
    return tok


def _config_token(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def special_ids(tok: Tokenizer, where: Path | str | None = None, config: dict | None = None) -> SpecialIds:
    """bos / eos of a tokenizer: tokenizer_config.json's names when beside it, else DeepSeek's names."""
    bos_name, eos_name = BOS, EOS
    if config is None and where is not None:
        cfg_file = Path(where).parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                config = None
    if isinstance(config, dict):
        bos_name = _config_token(config.get("bos_token")) or bos_name
        eos_name = _config_token(config.get("eos_token")) or eos_name
    bos_id, eos_id = tok.token_to_id(bos_name), tok.token_to_id(eos_name)
    if eos_id is None:
        raise ValueError(f"tokenizer {where or ''} has no end-of-sentence token {eos_name!r} "
                         "(documents are separated by it)".replace("  ", " "))
    if bos_id is None:  # documents then start with eos only
        bos_id, bos_name = eos_id, eos_name
    return SpecialIds(bos_id, eos_id, bos_name, eos_name)


def save_tokenizer(tok: Tokenizer, directory: Path, ids: SpecialIds | None = None,
                   model_max_length: int | None = None, source: Path | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (bos added by default, as DeepSeek's), atomically each. With the
    ``source`` of a given tokenizer (a checkpoint's directory or tokenizer.json), its chat template comes along:
    ``chat_template`` of its tokenizer_config.json and the template files beside it."""
    ids = ids or special_ids(tok)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "tokenizer.json", tok.to_str())
    chat: dict = {}
    if source is not None:
        from ..tokenizer import TOKENIZER_CONFIG_FILE, copy_chat_template_files

        src = tokenizer_file(source).parent
        if (src / TOKENIZER_CONFIG_FILE).is_file():
            given = read_json_object(src / TOKENIZER_CONFIG_FILE)
            chat = {"chat_template": given["chat_template"]} if given.get("chat_template") else {}
        copy_chat_template_files(src, directory)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": ids.bos,
        "eos_token": ids.eos,
        "pad_token": ids.eos,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length or 1 << 20,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **chat,
    }
    atomic_write_json(directory / "tokenizer_config.json", config, ensure_ascii=False)
