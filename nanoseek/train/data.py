"""Training data: corpus discovery, the train/validation split, tokenization (parallel, cached on disk), packing
into fixed-length sequences read through a memory map, and a resumable random batch order.

Corpus specs (``TrainConfig.data``; none means the Python standard library of the running interpreter):
  - a text file, a directory (every file under it, hidden ones excluded), or a glob (``src/**/*.py``; a
    directory it matches is read like a directory named directly);
  - ``*.jsonl``: one JSON object per line, its ``text`` field (``--text-field``) is a document;
  - ``hf:NAME``, ``hf:NAME:SPLIT``, ``hf:NAME:CONFIG:SPLIT``: a Hugging Face dataset (needs ``datasets``).
Undecodable (non-UTF-8 or binary) files and malformed JSONL lines are skipped and counted, never fatal.

Documents are split by id (a hash of the path relative to the spec), so the split is the same on every
machine and does not move when the corpus grows. Each document is stored as ``bos + tokens + eos`` in one
token stream per split; window i of a split is tokens[i*T : i*T + T + 1] (inputs and shifted labels).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..atomic import atomic_open, atomic_write_text
from ..config import ModelConfig
from ..paths import cache_root

TOKEN_FORMAT = 1  # bump when the packing below changes: invalidates the token cache
ENCODE_CHUNK = 512  # documents per encode_batch call


@dataclass
class Document:
    id: str  # stable across machines: decides the split
    text: str
    origin: str = ""  # where it was read (resolved path, line): the same file named twice is read once


@dataclass
class Corpus:
    """The documents of one corpus, split into train and validation, and what was skipped while reading."""

    sources: list[str]
    train: list[Document] = field(default_factory=list)
    val: list[Document] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    split_by: str = "document"

    def skip(self, reason: str, what: str) -> None:
        self.skipped[reason] += 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(what)

    @property
    def n_chars(self) -> int:
        return sum(len(d.text) for d in self.train) + sum(len(d.text) for d in self.val)


# ---------------------------------------------------------------------------------------------- discovery
def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library (``sysconfig``'s stdlib path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents(corpus: Corpus) -> Iterator[Document]:
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library was not found at {root}; pass --data")
    skip_dirs = {"site-packages", "dist-packages", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip_dirs.intersection(rel.parts) or not path.is_file():
            continue
        doc = _read_text(path, "stdlib/" + rel.as_posix(), corpus)
        if doc is not None:
            yield doc


def _read_text(path: Path, doc_id: str, corpus: Corpus) -> Document | None:
    try:
        raw = path.read_bytes()
    except OSError as e:
        corpus.skip("unreadable", f"{path} ({e.strerror})")
        return None
    if b"\x00" in raw:
        corpus.skip("binary", str(path))
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        corpus.skip("undecodable", str(path))
        return None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        corpus.skip("empty", str(path))
        return None
    return Document(doc_id, text, str(path.resolve()))


def _jsonl_documents(path: Path, doc_id: str, text_field: str, corpus: Corpus) -> Iterator[Document]:
    try:
        fh = path.open("rb")
    except OSError as e:
        corpus.skip("unreadable", f"{path} ({e.strerror})")
        return
    with fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line.decode("utf-8-sig"))  # -sig: a byte order mark before the first line
            except (UnicodeDecodeError, json.JSONDecodeError):
                corpus.skip("malformed JSONL line", where)
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                corpus.skip(f"JSONL line without a string {text_field!r}", where)
                continue
            if text.strip():
                yield Document(f"{doc_id}:{n}", text, f"{path.resolve()}:{n}")
            else:
                corpus.skip("empty", where)


def _file_documents(path: Path, doc_id: str, text_field: str, corpus: Corpus) -> Iterator[Document]:
    if path.suffix.lower() == ".jsonl":
        yield from _jsonl_documents(path, doc_id, text_field, corpus)
    else:
        doc = _read_text(path, doc_id, corpus)
        if doc is not None:
            yield doc


RUN_MARKER = "train_config.json"  # what every nanoseek run directory holds (train.loop)


def _dir_files(root: Path, prefix: str, corpus: Corpus) -> Iterator[tuple[Path, str]]:
    """Every file under ``root`` (hidden ones and __pycache__ excluded) with its id ``prefix/relative path``."""
    for dirpath, dirnames, filenames in os.walk(root):
        if RUN_MARKER in filenames:  # a training run's own files (metrics, tokenizer, config) are not text to learn
            corpus.skip("run directory", dirpath)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                yield path, f"{prefix}/{path.relative_to(root).as_posix()}"


def _dir_documents(root: Path, prefix: str, text_field: str, corpus: Corpus) -> Iterator[Document]:
    for path, doc_id in _dir_files(root, prefix, corpus):
        yield from _file_documents(path, doc_id, text_field, corpus)


def _hf_documents(spec: str, text_field: str, corpus: Corpus) -> Iterator[Document]:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"{spec!r}: a Hugging Face dataset is hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else "train")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ValueError(f"{spec}: Hugging Face datasets need the optional `datasets` package "
                         "(pip install datasets); or pass text files, directories or JSONL") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name, bad split: all one-line errors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load Hugging Face dataset {spec}: {msg}") from None
    if text_field not in getattr(ds, "column_names", [text_field]):
        raise ValueError(f"Hugging Face dataset {spec} has no {text_field!r} column "
                         f"(columns: {', '.join(ds.column_names)}); set --text-field")
    for i, row in enumerate(ds):
        text = row.get(text_field)
        if isinstance(text, str) and text.strip():
            yield Document(f"{spec}:{i}", text, f"{spec}:{i}")
        else:
            corpus.skip("empty", f"{spec}:{i}")


def iter_documents(specs: list[str], text_field: str, corpus: Corpus, root: str | None = None) -> Iterator[Document]:
    """Every document of the corpus specs, in a deterministic order (see the module docstring). Directories
    that hold a nanoseek run (its train_config.json) are left out, the run being trained included. Relative
    paths and globs are read from ``root`` (None: the working directory); a glob's matches keep their ids
    relative to it."""
    if not specs:
        yield from _stdlib_documents(corpus)
        return
    for spec in specs:
        if spec.startswith("hf:"):
            yield from _hf_documents(spec, text_field, corpus)
            continue
        path = Path(spec).expanduser()
        relative_to = root if root and not path.is_absolute() else None
        if relative_to:
            path = Path(relative_to) / path
        if path.is_dir():
            yield from _dir_documents(path, path.name or "data", text_field, corpus)
        elif path.is_file():
            yield from _file_documents(path, path.name, text_field, corpus)
        elif glob.has_magic(spec):
            yield from _glob_documents(spec, relative_to, text_field, corpus)
        elif path.exists():  # /dev/null, a FIFO, a socket: nothing to read as a corpus
            raise ValueError(f"--data {spec}: not a regular file or directory")
        else:
            raise FileNotFoundError(f"--data {spec}: no such file or directory")


def _glob_documents(spec: str, relative_to: str | None, text_field: str, corpus: Corpus) -> Iterator[Document]:
    """A glob's files: a matched file as itself, a matched directory as every file under it (as when named
    directly: ``data/*`` over a folder of folders reads them all). Ids are the matched paths, read in their
    sorted order, so a file matched both itself and through its directory (``src/**``) is read once."""
    matches = glob.glob(os.path.expanduser(spec), root_dir=relative_to, recursive=True)
    where = f" (from {relative_to})" if relative_to else ""
    if not matches:
        raise FileNotFoundError(f"--data {spec}: the pattern matches no file{where}")
    files: dict[str, Path] = {}  # id -> path
    for m in matches:
        p = Path(relative_to, m) if relative_to else Path(m)
        if p.is_file():
            files[Path(m).as_posix()] = p
        elif p.is_dir():
            files.update((doc_id, f) for f, doc_id in _dir_files(p, Path(m).as_posix(), corpus))
    if not files:
        raise FileNotFoundError(f"--data {spec}: the pattern matches no file{where}, only directories without files")
    for doc_id in sorted(files):
        yield from _file_documents(files[doc_id], doc_id, text_field, corpus)


def _unit_hash(doc_id: str) -> float:
    """A document's place in [0, 1): deterministic, machine-independent."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def load_corpus(specs: list[str], text_field: str = "text", val_fraction: float = 0.05,
                max_chars: int | None = None, root: str | None = None) -> Corpus:
    """Read and split a corpus (relative paths and globs from ``root``). Raises ValueError when it holds no
    text."""
    corpus = Corpus(sources=list(specs) or [f"stdlib:{stdlib_root()}"])
    docs = list(iter_documents(specs, text_field, corpus, root))
    origins: set[str] = set()
    ids: Counter = Counter()
    unique = []
    for d in docs:
        if d.origin in origins:  # the same file named twice (a directory and a file in it) counts once
            continue
        origins.add(d.origin)
        ids[d.id] += 1
        if ids[d.id] > 1:  # another file of the same name (a/notes.txt and b/notes.txt): a distinct id
            d = Document(f"{d.id}#{ids[d.id]}", d.text, d.origin)
        unique.append(d)
    docs = unique
    if max_chars is not None:
        kept, total = set(), 0
        for d in sorted(docs, key=lambda d: _unit_hash("cap:" + d.id)):
            if total >= max_chars:
                break
            kept.add(d.id)
            total += len(d.text)
        docs = [d for d in docs if d.id in kept]
    if not docs:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(corpus.skipped.items()))
        where = ", ".join(corpus.sources)
        raise ValueError(f"the corpus {where} holds no text" + (f" (skipped: {skipped})" if skipped else ""))
    for d in docs:
        (corpus.val if _unit_hash(d.id) < val_fraction else corpus.train).append(d)
    if val_fraction > 0 and (not corpus.train or not corpus.val):
        # too few documents to split by document: hold out the tail of every document instead
        corpus.split_by = "tail of each document"
        corpus.train, corpus.val = [], []
        for d in docs:
            cut = int(len(d.text) * (1.0 - val_fraction))
            nl = d.text.rfind("\n", 0, cut)
            cut = nl + 1 if nl > 0 else cut
            if d.text[:cut].strip():
                corpus.train.append(Document(d.id, d.text[:cut]))
            if d.text[cut:].strip():
                corpus.val.append(Document(d.id + "#val", d.text[cut:]))
        if not corpus.train:
            corpus.train, corpus.val = docs, []
    return corpus


def corpus_key(docs: list[Document]) -> str:
    """A digest of the documents' ids and contents, in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode("utf-8"))
        h.update(b"\x00")
        h.update(hashlib.sha256(d.text.encode("utf-8")).digest())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- cache
def cache_dir(configured: str | None = None) -> Path:
    """The tokenizer and token cache, created: ``configured`` (--cache-dir), else $NANOSEEK_CACHE, else
    $XDG_CACHE_HOME/nanoseek or ~/.cache/nanoseek. A one-line ValueError naming it when it cannot be used."""
    root = cache_root(configured)
    problem = _unusable(root)
    if problem:
        raise ValueError(f"cache directory {root} (--cache-dir / $NANOSEEK_CACHE) is not usable: {problem}")
    return root


def _unusable(directory: Path) -> str | None:
    """Why ``directory`` cannot be created or written in, or None."""
    if directory.exists() and not directory.is_dir():
        return "it is not a directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    return None if os.access(directory, os.W_OK | os.X_OK) else "no permission to write in it"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenFile:
    """One split's token stream on disk."""

    path: Path
    dtype: str
    n_tokens: int
    n_docs: int
    key: str

    def tokens(self) -> np.ndarray:
        if self.n_tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))


def tokenize_split(docs: list[Document], tokenizer, tokenizer_hash: str, bos_id: int, eos_id: int,
                   root: Path) -> TokenFile:
    """``bos + tokens + eos`` for every document, as one flat array cached under ``root/tokens``.

    The cache key covers the documents (ids and contents), the tokenizer file and the packing format, so a
    changed file or tokenizer is tokenized again and an unchanged corpus never is. Encoding runs on all cores
    (the tokenizers library's parallel batch encoder); the file is written under a temporary name and
    renamed, so a concurrent or interrupted run never sees a partial cache entry.
    """
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab)
    h = hashlib.sha256(f"tokens-v{TOKEN_FORMAT}:{tokenizer_hash}:{bos_id}:{eos_id}:{dtype.str}:".encode())
    h.update(corpus_key(docs).encode())
    key = h.hexdigest()[:32]
    d = root / "tokens"
    path, meta_path = d / f"{key}.bin", d / f"{key}.json"
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if path.stat().st_size == meta["n_tokens"] * dtype.itemsize:
                return TokenFile(path, dtype.str, meta["n_tokens"], meta["n_docs"], key)
        except (ValueError, KeyError, OSError):
            pass  # a damaged entry: rebuild it
    d.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_open(path, "wb") as f:
        for start in range(0, len(docs), ENCODE_CHUNK):
            texts = [doc.text for doc in docs[start:start + ENCODE_CHUNK]]
            encodings = _encode_batch(tokenizer, texts)
            parts = []
            for ids in encodings:
                parts.append(np.fromiter([bos_id, *ids, eos_id], dtype=np.int64, count=len(ids) + 2))
            if parts:
                arr = np.concatenate(parts)
                if arr.size and (arr.max() >= vocab or arr.min() < 0):
                    raise ValueError("the tokenizer produced ids outside its vocabulary")
                arr.astype(dtype).tofile(f)
                n += arr.size
    atomic_write_text(meta_path, json.dumps({"n_tokens": n, "n_docs": len(docs), "dtype": dtype.str}))
    return TokenFile(path, dtype.str, n, len(docs), key)


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float | None:
    """Cross-entropy (nats/token) on ``val`` of the add-one-smoothed unigram model of ``train``: the loss a
    model that ignores context would reach; a trained model should be well below it."""
    if len(train) == 0 or len(val) == 0:
        return None
    counts = np.bincount(np.asarray(train), minlength=vocab_size).astype(np.float64)
    logp = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    return float(-logp[np.asarray(val)].mean())


# ---------------------------------------------------------------------------------------------- sequences
class PackedSequences:
    """Fixed-length windows of a token stream: window i = tokens[i*T : i*T + T + 1] (memory-mapped)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.n = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: list[int] | np.ndarray) -> torch.Tensor:
        T = self.seq_len
        rows = [np.asarray(self.tokens[i * T: i * T + T + 1], dtype=np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows))  # (B, T + 1)


class BatchStream:
    """Sequences in a seeded random order, epoch after epoch; ``position`` (epoch, cursor) resumes it exactly."""

    def __init__(self, data: PackedSequences, batch_size: int, seed: int, epoch: int = 0, cursor: int = 0):
        if len(data) == 0:
            raise ValueError("no sequence to train on")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.cursor = epoch, cursor
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            self._order, self._order_epoch = rng.permutation(len(self.data)), self.epoch
        return self._order

    def next(self) -> torch.Tensor:
        idx = []
        while len(idx) < self.batch_size:
            order = self._epoch_order()
            take = order[self.cursor: self.cursor + self.batch_size - len(idx)]
            idx.extend(take.tolist())
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return self.data.batch(idx)

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}


def validation_batches(data: PackedSequences, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    """A fixed validation set: up to n_batches * batch_size windows spread evenly over the split."""
    n = min(len(data), batch_size * n_batches)
    if n == 0:
        return []
    idx = np.unique(np.linspace(0, len(data) - 1, n).round().astype(np.int64))
    return [data.batch(idx[i:i + batch_size]) for i in range(0, len(idx), batch_size)]


# ---------------------------------------------------------------------------------------------- all of it
@dataclass
class PreparedData:
    """What training reads: the tokenizer, and the two token streams with their summary."""

    tokenizer: Any
    bos_id: int
    eos_id: int
    vocab_size: int
    train: TokenFile
    val: TokenFile
    summary: dict[str, Any]

    def train_sequences(self, seq_len: int) -> PackedSequences:
        return PackedSequences(self.train.tokens(), seq_len)

    def val_sequences(self, seq_len: int) -> PackedSequences:
        tokens = self.val.tokens()
        return PackedSequences(tokens, min(seq_len, max(1, len(tokens) - 1)))


def prepare_data(cfg, run_dir: Path | None = None, tokenizer_path: Path | None = None, log=print) -> PreparedData:
    """Read the corpus, get a tokenizer (given, cached, or trained on the train split), tokenize both splits.

    ``tokenizer_path`` (a resumed run's own tokenizer.json) wins over ``cfg.tokenizer``. When ``run_dir`` is
    given, the tokenizer files are written there (atomically) for the checkpoint.
    """
    from . import tokenizer_train as tt

    root = cache_dir(cfg.cache_dir)
    max_chars = int(cfg.max_corpus_mb * 1e6) if cfg.max_corpus_mb else None
    corpus = load_corpus(cfg.data, cfg.text_field, cfg.val_fraction, max_chars, root=cfg.data_root)
    n_skipped = sum(corpus.skipped.values())
    log(f"corpus: {len(corpus.train)} train / {len(corpus.val)} validation documents "
        f"({corpus.n_chars / 1e6:.1f} M characters; split by {corpus.split_by})"
        + (f"; skipped {n_skipped}: " + ", ".join(f"{n} {r}" for r, n in sorted(corpus.skipped.items()))
           if n_skipped else ""))
    given = tokenizer_path or (Path(cfg.tokenizer) if cfg.tokenizer else None)
    if given is not None:
        tokenizer, source = tt.load_tokenizer(given), str(given)
        info = tt.special_ids(tokenizer, where=tt.tokenizer_file(given))
    else:
        tokenizer, source = tt.trained_tokenizer(corpus.train, cfg.vocab_size, root, log=log)
        info = tt.special_ids(tokenizer)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    tok_json = tokenizer.to_str()
    tok_hash = hashlib.sha256(tok_json.encode("utf-8")).hexdigest()
    if run_dir is not None:
        # the model's context, as a checkpoint's tokenizer_config.json gives it (not the training --seq-len)
        context = dict(cfg.model_overrides).get("max_position_embeddings") \
            or ModelConfig.preset(cfg.preset).max_position_embeddings
        tt.save_tokenizer(tokenizer, run_dir, info, model_max_length=int(context), source=given)
    train = tokenize_split(corpus.train, tokenizer, tok_hash, info.bos_id, info.eos_id, root)
    val = tokenize_split(corpus.val, tokenizer, tok_hash, info.bos_id, info.eos_id, root)
    unigram = unigram_cross_entropy(train.tokens(), val.tokens(), vocab)
    log(f"tokens: {train.n_tokens:,} train / {val.n_tokens:,} validation (vocabulary {vocab:,}"
        + (f"; unigram cross-entropy on validation {unigram:.3f} nats" if unigram is not None else "") + ")")
    summary = {
        "sources": corpus.sources,
        "split_by": corpus.split_by,
        "documents": {"train": len(corpus.train), "val": len(corpus.val)},
        "characters": corpus.n_chars,
        "skipped": dict(corpus.skipped),
        "skipped_examples": corpus.skipped_examples,
        "tokens": {"train": train.n_tokens, "val": val.n_tokens},
        "tokenizer": source,
        "tokenizer_sha256": tok_hash,
        "vocab_size": vocab,
        "unigram_val_loss": unigram,
        "cache": {"train": train.key, "val": val.key},
    }
    return PreparedData(tokenizer, info.bos_id, info.eos_id, vocab, train, val, summary)
