"""Training data and tokenizer: corpus discovery, skipped files, the deterministic split, the token cache,
packing and resumable batches, the BPE in DeepSeek's tokenizer.json layout."""

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
from collections import Counter

import numpy as np
import pytest

from nanoseek.train import data as D
from nanoseek.train import tokenizer_train as tt
from nanoseek.train.config import TrainConfig

CODE = '''import os


def walk(root):
    """Yield every file under root."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            yield os.path.join(dirpath, name)  # ünïcode ok


class Counter:
    def __init__(self, start=0):
        self.value = start

    def add(self, n=1):
        self.value += n
        return self.value
'''


def make_corpus(root, n=12):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"mod{i}.py").write_text(CODE.replace("Counter", f"Counter{i}") * 3)
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "deep.py").write_text(CODE)
    (root / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (root / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (root / "empty.py").write_text("  \n")
    (root / ".hidden.py").write_text("hidden = True\n")
    return root


def test_directory_corpus_skips_and_counts_bad_files(tmp_path):
    corpus = D.load_corpus([str(make_corpus(tmp_path / "c"))], val_fraction=0.2)
    ids = sorted(d.id for d in corpus.train + corpus.val)
    assert ids == sorted([f"c/mod{i}.py" for i in range(12)] + ["c/sub/deep.py"])
    assert corpus.skipped == {"undecodable": 1, "binary": 1, "empty": 1}
    assert corpus.train and corpus.val


def test_split_is_by_document_and_deterministic(tmp_path):
    root = make_corpus(tmp_path / "c")
    a = D.load_corpus([str(root)], val_fraction=0.3)
    (root / "new.py").write_text(CODE)  # adding a file moves no other file between the splits
    b = D.load_corpus([str(root)], val_fraction=0.3)
    assert {d.id for d in a.val} <= {d.id for d in b.val}
    assert {d.id for d in a.train} <= {d.id for d in b.train}


def test_split_does_not_depend_on_where_the_corpus_lies(tmp_path):
    """A document is held out when sha256 of its id (its path relative to the spec) puts it below val_fraction,
    by hand here; so the same corpus in another directory (another machine) splits the same way."""
    here = make_corpus(tmp_path / "one" / "c")
    shutil.copytree(here, tmp_path / "two" / "c")
    a = D.load_corpus([str(here)], val_fraction=0.3)
    b = D.load_corpus([str(tmp_path / "two" / "c")], val_fraction=0.3)
    ids = sorted(d.id for d in a.train + a.val)
    held_out = [i for i in ids if int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") / 2 ** 64 < 0.3]
    assert 0 < len(held_out) < len(ids)
    assert sorted(d.id for d in a.val) == sorted(d.id for d in b.val) == held_out
    assert sorted(d.id for d in a.train) == sorted(d.id for d in b.train) == sorted(set(ids) - set(held_out))


def test_single_file_is_split_by_its_tail(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    c = D.load_corpus([str(f)], val_fraction=0.1)
    assert c.split_by == "tail of each document"
    assert c.train[0].text + c.val[0].text == f.read_text()
    assert c.val[0].text.startswith("line 9")


def test_jsonl_glob_and_errors(tmp_path):
    j = tmp_path / "docs.jsonl"
    j.write_text(json.dumps({"text": "hello world"}) + "\n{broken\n" + json.dumps({"body": "x"}) + "\n"
                 + json.dumps({"text": "second doc"}) + "\n")
    c = D.load_corpus([str(j)], val_fraction=0.0)
    assert [d.text for d in c.train] == ["hello world", "second doc"]
    assert c.skipped["malformed JSONL line"] == 1 and sum(c.skipped.values()) == 2
    make_corpus(tmp_path / "g")
    c = D.load_corpus([str(tmp_path / "g" / "**" / "*.py")], val_fraction=0.0)
    assert len(c.train) == 13
    # a relative glob from a root: the same documents, with ids relative to the root (as from that directory)
    rel = D.load_corpus(["g/**/*.py"], val_fraction=0.0, root=str(tmp_path))
    assert [d.text for d in rel.train] == [d.text for d in c.train]
    assert all(not d.id.startswith("/") and d.id.startswith("g/") for d in rel.train)
    with pytest.raises(FileNotFoundError, match="no such file"):
        D.load_corpus([str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        D.load_corpus([str(tmp_path / "*.nothing")])
    with pytest.raises(ValueError, match="not a regular file or directory"):
        D.load_corpus([os.devnull])
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "bad.py").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="holds no text.*1 undecodable"):
        D.load_corpus([str(tmp_path / "e")])


def test_jsonl_reads_the_configured_text_field_and_counts_what_it_skips(tmp_path):
    """--text-field body: each line's "body" is the document (never its "text"); a blank body is counted as
    empty, a line without a string body as such; blank lines are no documents and not counted."""
    j = tmp_path / "docs.jsonl"
    rows = [{"body": "first", "text": "not this"}, {"body": "  "}, {"text": "no body"}, {"body": 3}, {"body": "second"}]
    j.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    c = D.load_corpus([str(j)], text_field="body", val_fraction=0.0)
    assert [(d.id, d.text) for d in c.train] == [("docs.jsonl:1", "first"), ("docs.jsonl:5", "second")]
    assert c.skipped == {"empty": 1, "JSONL line without a string 'body'": 2}


def test_jsonl_with_a_byte_order_mark_keeps_its_first_line(tmp_path):
    """A JSONL file saved with a UTF-8 byte order mark (as some editors write it): its first line is a document,
    as a text file's first line is, not a malformed line."""
    j = tmp_path / "bom.jsonl"
    j.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"})).encode())
    c = D.load_corpus([str(j)], val_fraction=0.0)
    assert [d.text for d in c.train] == ["first", "second"]
    assert not c.skipped


def test_jsonl_suffix_in_capitals_is_jsonl(tmp_path):
    """DATA.JSONL is read line by line as any .jsonl, not as one text document of raw JSON."""
    j = tmp_path / "DATA.JSONL"
    j.write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    assert [d.text for d in D.load_corpus([str(j)], val_fraction=0.0).train] == ["first", "second"]


def test_files_of_the_same_name_are_all_read_and_one_file_named_twice_once(tmp_path):
    for side in ("a", "b"):
        (tmp_path / side / "src").mkdir(parents=True)
        (tmp_path / side / "src" / "notes.txt").write_text(f"notes of {side}\n")
        (tmp_path / side / "data.jsonl").write_text(json.dumps({"text": f"line of {side}"}) + "\n")
    a, b = tmp_path / "a", tmp_path / "b"
    specs = [a / "src" / "notes.txt", b / "src" / "notes.txt", a / "src", b / "src", a / "data.jsonl",
             b / "data.jsonl", a / "src" / "notes.txt"]  # the notes twice each, once more at the end
    c = D.load_corpus([str(p) for p in specs], val_fraction=0.0)
    assert [(d.id, d.text) for d in c.train] == [
        ("notes.txt", "notes of a\n"), ("notes.txt#2", "notes of b\n"),
        ("data.jsonl:1", "line of a"), ("data.jsonl:1#2", "line of b")]


def test_a_run_directory_inside_the_corpus_is_left_out(tmp_path):
    root = make_corpus(tmp_path / "c", n=2)
    run = root / "runs" / "mine"
    run.mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"text": "not a document"}) + "\n")
    c = D.load_corpus([str(root)], val_fraction=0.0)
    assert sorted(d.id for d in c.train) == ["c/mod0.py", "c/mod1.py", "c/sub/deep.py"]
    assert c.skipped["run directory"] == 1


def test_default_corpus_leaves_out_installed_packages_and_caches(tmp_path, monkeypatch):
    """The standard library corpus skips site-packages, dist-packages and __pycache__ wherever they are."""
    root = tmp_path / "lib"
    for rel in ("os.py", "json/__init__.py", "site-packages/pkg/mod.py", "dist-packages/x.py", "json/__pycache__/y.py",
                "json/site-packages/z.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")
    monkeypatch.setattr(D, "stdlib_root", lambda: root)
    assert [d.id for d in D.iter_documents([], "text", D.Corpus(sources=[]))] == ["stdlib/json/__init__.py",
                                                                                  "stdlib/os.py"]


def test_hf_dataset_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ValueError, match="pip install datasets"):
        D.load_corpus(["hf:roneneldan/TinyStories"])


def test_hf_dataset_through_the_datasets_api(monkeypatch):
    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split):
            assert (name, config, split) == ("org/ds", None, "validation")
            return FakeDs()

    class FakeDs(list):
        column_names = ["text"]

    rows = FakeDs([{"text": "a b c"}, {"text": ""}, {"text": "d e"}])
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    monkeypatch.setattr(FakeDatasets, "load_dataset", staticmethod(lambda name, config, split: rows))
    c = D.load_corpus(["hf:org/ds:validation"], val_fraction=0.0)
    assert [d.text for d in c.train] == ["a b c", "d e"] and c.skipped["empty"] == 1


def test_default_corpus_is_the_stdlib():
    c = D.Corpus(sources=[])
    docs = list(itertools.islice(D.iter_documents([], "text", c), 5))
    assert all(d.id.startswith("stdlib/") and d.id.endswith(".py") for d in docs)
    assert (D.stdlib_root() / "os.py").is_file()


def test_bpe_in_deepseek_layout_round_trips_code(tmp_path):
    tok = tt.train_bpe([CODE] * 20, 300)
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id(tt.BOS) == 0 and tok.token_to_id(tt.EOS) == 1
    ids = tok.encode(CODE, add_special_tokens=False).ids
    assert tok.decode(ids) == CODE and len(ids) < 0.75 * len(CODE.encode())
    assert tok.encode("x").ids[0] == 0  # the post-processor prepends bos, as DeepSeek's
    tt.save_tokenizer(tok, tmp_path)
    layout = json.loads((tmp_path / "tokenizer.json").read_text())
    kinds = [p["type"] for p in layout["pre_tokenizer"]["pretokenizers"]]
    assert kinds == ["Split", "Split", "Split", "ByteLevel"] and layout["decoder"]["type"] == "ByteLevel"
    assert layout["model"]["type"] == "BPE" and layout["post_processor"]["type"] == "TemplateProcessing"
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == (tt.BOS, tt.EOS, True)
    again = tt.load_tokenizer(tmp_path)
    assert again.encode(CODE).ids == tok.encode(CODE).ids


def test_trained_tokenizer_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tt.save_tokenizer(tt.train_bpe([CODE] * 20, 300), tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.bos_token_id == 0 and hf.eos_token_id == 1
    assert hf.decode(hf(CODE)["input_ids"], skip_special_tokens=True) == CODE


def test_special_ids_follow_the_tokenizer_config_names(tmp_path):
    """A given tokenizer with other bos / eos names (<s>, </s>, added after the BPE's tokens): the
    tokenizer_config.json beside its tokenizer.json names them, so documents are separated by </s> (a config
    given as a dict too); without a bos token documents start with eos."""
    from tokenizers import AddedToken

    tok = tt.train_bpe([CODE] * 20, 300)
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<a>", "<b>", "<s>", "<c>", "</s>")])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    assert tt.special_ids(tok, where=tmp_path / "tokenizer.json") == (bos, eos, "<s>", "</s>")
    assert tt.special_ids(tok, config={"eos_token": "</s>", "bos_token": "<none>"}) == (eos, eos, "</s>", "</s>")
    assert tt.special_ids(tok) == (0, 1, tt.BOS, tt.EOS)  # no config: DeepSeek's names


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tt.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        tt.load_tokenizer(tmp_path)
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no end-of-sentence token"):
        tt.load_tokenizer(tmp_path)
    for bad in (10, 257, 10**9):
        with pytest.raises(ValueError, match="--vocab-size must be an integer in"):
            TrainConfig(vocab_size=bad).validate()
    for bad in (1, 4):
        with pytest.raises(ValueError, match="--seq-len must be"):
            TrainConfig(seq_len=bad).validate()
    # a single string (the Python API) was taken as one data spec per character
    with pytest.raises(ValueError, match="data must be a list of files, directories, globs or hf: datasets, got str"):
        TrainConfig(data="corpus.txt").validate()
    TrainConfig(data=["corpus.txt"]).validate()


def test_unusable_cache_directory_is_named_before_the_corpus_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "load_corpus", lambda *a, **k: pytest.fail("the corpus was read first"))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for configured, env, problem in ((str(a_file), None, "it is not a directory"),
                                     (None, str(a_file / "sub"), "Not a directory")):
        monkeypatch.setenv("NANOSEEK_CACHE", env or str(tmp_path / "unused"))
        with pytest.raises(ValueError) as e:
            D.prepare_data(TrainConfig(cache_dir=configured))
        assert str(e.value) == (f"cache directory {configured or env} (--cache-dir / $NANOSEEK_CACHE) is not usable: "
                                f"{problem}")
    assert D.cache_dir(str(tmp_path / "new" / "cache")).is_dir()  # created


def test_token_cache_packing_and_unigram(tmp_path, monkeypatch):
    tok = tt.train_bpe([CODE] * 20, 300)
    docs = [D.Document("a", CODE), D.Document("b", "x = 1\n")]
    f = D.tokenize_split(docs, tok, "h1", 0, 1, tmp_path)
    arr = f.tokens()
    a = tok.encode(CODE, add_special_tokens=False).ids
    assert arr.dtype == np.uint16 and list(arr[: len(a) + 2]) == [0, *a, 1]
    assert arr[-1] == 1 and f.n_tokens == len(arr) and f.n_docs == 2
    monkeypatch.setattr(D, "_encode_batch", lambda *a: pytest.fail("tokenized again"))
    assert D.tokenize_split(docs, tok, "h1", 0, 1, tmp_path).key == f.key  # cached
    monkeypatch.undo()
    assert D.tokenize_split(docs, tok, "h2", 0, 1, tmp_path).key != f.key  # another tokenizer
    changed = [D.Document("a", CODE + "#\n"), docs[1]]
    assert D.tokenize_split(changed, tok, "h1", 0, 1, tmp_path).key != f.key  # another content

    seqs = D.PackedSequences(arr, 16)
    assert len(seqs) == (len(arr) - 1) // 16
    b = seqs.batch([0, 2])
    assert b.shape == (2, 17) and b[1].tolist() == arr[32:49].tolist()

    # the unigram baseline: -mean log p with add-one smoothing
    train, val = np.array([0, 0, 1, 2]), np.array([0, 2])
    p = np.array([3, 2, 2]) / 7.0
    assert D.unigram_cross_entropy(train, val, 3) == pytest.approx(-(math.log(p[0]) + math.log(p[2])) / 2)


def test_token_stream_is_every_document_between_bos_and_eos(tmp_path, monkeypatch):
    """5 documents encoded 2 per batch (ENCODE_CHUNK 2): the stream is bos + ids + eos of each document in order,
    each encoded here on its own, none dropped or repeated at a batch's edge; a token file cut short (damaged)
    is tokenized again, not read back."""
    monkeypatch.setattr(D, "ENCODE_CHUNK", 2)
    tok = tt.train_bpe([CODE] * 20, 300)
    texts = [CODE, "x = 1\n", "def f():\n    pass\n", "y = [1, 2]\n", "z = 'end'\n"]
    docs = [D.Document(str(i), t) for i, t in enumerate(texts)]
    expected = [t for text in texts for t in [0, *tok.encode(text, add_special_tokens=False).ids, 1]]
    f = D.tokenize_split(docs, tok, "h", 0, 1, tmp_path)
    assert f.tokens().tolist() == expected and (f.n_tokens, f.n_docs) == (len(expected), 5)
    with open(f.path, "r+b") as fh:
        fh.truncate(10)
    assert D.tokenize_split(docs, tok, "h", 0, 1, tmp_path).tokens().tolist() == expected
    # uint16 holds ids up to 65535: a vocabulary of 2^16 tokens, not one more
    assert (D.token_dtype(1 << 16), D.token_dtype((1 << 16) + 1)) == (np.uint16, np.uint32)


def test_unigram_baseline_is_the_train_splits_unigram_on_validation(tmp_path):
    """data.json's unigram_val_loss by hand: token counts of the train split's stream (bos, tokens, eos of each
    train document, encoded here) with add-one smoothing over the vocabulary, mean -log p over the validation
    stream. The two prepared streams are those, and no document is in both splits."""
    root = make_corpus(tmp_path / "c")
    cfg = TrainConfig(data=[str(root)], vocab_size=300, val_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    data = D.prepare_data(cfg, log=lambda _msg: None)
    corpus = D.load_corpus([str(root)], val_fraction=0.3)
    assert corpus.val and not {d.id for d in corpus.train} & {d.id for d in corpus.val}

    def stream(docs):
        return [t for d in docs for t in [data.bos_id, *data.tokenizer.encode(d.text, add_special_tokens=False).ids,
                                          data.eos_id]]

    train, val = stream(corpus.train), stream(corpus.val)
    assert data.train.tokens().tolist() == train and data.val.tokens().tolist() == val
    counts, n = Counter(train), len(train) + data.vocab_size
    expected = -sum(math.log((counts[t] + 1) / n) for t in val) / len(val)
    assert data.summary["unigram_val_loss"] == pytest.approx(expected, rel=1e-9)


def test_validation_batches_are_spread_over_the_split():
    seqs = D.PackedSequences(np.arange(101), 10)  # 10 windows: window i starts with token 10 i
    batches = D.validation_batches(seqs, 2, 2)  # 4 windows: round(linspace(0, 9, 4)) = 0, 3, 6, 9
    assert [b[:, 0].tolist() for b in batches] == [[0, 30], [60, 90]] and batches[0].shape == (2, 11)
    # more asked than there are: every window once, in batches of 4, 4, 2
    assert [b[:, 0].tolist() for b in D.validation_batches(seqs, 4, 5)] == [[0, 10, 20, 30], [40, 50, 60, 70],
                                                                             [80, 90]]


def test_cached_tokenizer_is_per_vocabulary_size(tmp_path):
    """The tokenizer cache is keyed by the vocabulary size too: another --vocab-size on the same documents trains
    a tokenizer of that size; the same one is read back from the cache."""
    docs = [D.Document(f"d{i}", CODE.replace("Counter", f"Counter{i}")) for i in range(5)]
    quiet = lambda _msg: None  # noqa: E731
    a, _ = tt.trained_tokenizer(docs, 300, tmp_path, log=quiet)
    b, source = tt.trained_tokenizer(docs, 320, tmp_path, log=quiet)
    assert (a.get_vocab_size(), b.get_vocab_size(), source) == (300, 320, "bpe:320")
    again, source = tt.trained_tokenizer(docs, 300, tmp_path, log=quiet)
    assert source == "bpe:300 (cached)" and again.to_str() == a.to_str()


def test_batch_stream_resumes_exactly():
    seqs = D.PackedSequences(np.arange(1000), 8)
    a = D.BatchStream(seqs, 5, seed=3)
    first = [a.next() for _ in range(40)]  # 200 windows > one epoch of 124
    b = D.BatchStream(seqs, 5, seed=3)
    for _ in range(17):
        b.next()
    c = D.BatchStream(seqs, 5, seed=3, **b.position)
    rest = [c.next() for _ in range(23)]
    assert all((x == y).all() for x, y in zip(first[17:], rest))
    seen = np.concatenate([x[:, 0].numpy() for x in first[:25]])  # first epoch: every window once
    assert len(set(seen[:124].tolist())) == 124
    assert not (D.BatchStream(seqs, 5, seed=4).next() == first[0]).all()


def test_batch_stream_reshuffles_every_epoch():
    """Each epoch visits every window exactly once, in its own seeded order: epoch 1's order is not epoch 0's
    (124 windows, 4 per batch: an epoch is exactly 31 batches)."""
    seqs = D.PackedSequences(np.arange(1000), 8)  # window i starts with token 8 i
    stream = D.BatchStream(seqs, 4, seed=3)
    epochs = []
    for epoch in range(3):
        assert stream.position == {"epoch": epoch, "cursor": 0}
        order = np.concatenate([stream.next()[:, 0].numpy() // 8 for _ in range(31)])
        assert sorted(order.tolist()) == list(range(124))  # a permutation: every window once
        epochs.append(order.tolist())
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    again = D.BatchStream(seqs, 4, seed=3, epoch=1)  # an epoch's order depends on (seed, epoch) only
    assert np.concatenate([again.next()[:, 0].numpy() // 8 for _ in range(31)]).tolist() == epochs[1]


def test_token_cache_key_covers_the_special_ids(tmp_path):
    """The same tokenizer (same hash) and documents with other bos / eos ids: another cache entry, holding the new
    ids (were the ids left out of the key, the cached stream with the old ones would be read back)."""
    tok = tt.train_bpe([CODE] * 20, 300)
    docs = [D.Document("a", CODE), D.Document("b", "x = 1\n")]
    a = D.tokenize_split(docs, tok, "h1", 0, 1, tmp_path)
    b = D.tokenize_split(docs, tok, "h1", 2, 3, tmp_path)
    swapped = D.tokenize_split(docs, tok, "h1", 1, 0, tmp_path)
    assert len({a.key, b.key, swapped.key}) == 3
    n = len(tok.encode(CODE, add_special_tokens=False).ids)
    for f, (bos, eos) in ((a, (0, 1)), (b, (2, 3)), (swapped, (1, 0))):
        arr = f.tokens()
        assert (arr[0], arr[n + 1], arr[n + 2], arr[-1]) == (bos, eos, bos, eos)


def test_glob_over_directories_reads_their_files_once(tmp_path):
    """A glob matching directories reads every file under them, as a directory named directly does (hidden files
    and run directories left out), and a file matched both itself and through its directory is read once."""
    for name in ("proj_a", "proj_b"):
        make_corpus(tmp_path / "repos" / name, n=2)
    (tmp_path / "repos" / "empty_dir").mkdir()
    run = tmp_path / "repos" / "proj_b" / "run"
    run.mkdir()
    (run / D.RUN_MARKER).write_text("{}")
    (run / "notes.txt").write_text("a run's own file\n")
    direct = D.load_corpus([str(tmp_path / "repos" / n) for n in ("proj_a", "proj_b")], val_fraction=0.0)
    globbed = D.load_corpus(["repos/*"], val_fraction=0.0, root=str(tmp_path))
    # the same files; ids from the matched paths (repos/proj_a/mod0.py, where the directory gives proj_a/mod0.py)
    assert sorted("repos/" + d.id for d in direct.train) == sorted(d.id for d in globbed.train)
    assert sorted(d.text for d in direct.train) == sorted(d.text for d in globbed.train)
    assert len(globbed.train) == 2 * 3 and all(d.id.startswith("repos/proj_") for d in globbed.train)
    assert globbed.skipped["run directory"] == 1 and globbed.skipped == direct.skipped
    # src/** matches the directories and every file in them: each file is one document
    everything = D.load_corpus(["repos/proj_a/**"], val_fraction=0.0, root=str(tmp_path))
    assert sorted(d.id for d in everything.train) == sorted(d.id for d in globbed.train if "proj_a" in d.id)
    with pytest.raises(FileNotFoundError, match="only directories without files"):
        D.load_corpus(["repos/empty*"], val_fraction=0.0, root=str(tmp_path))
