"""`nanoseek generate` and `nanoseek chat` on a tiny random checkpoint with a tokenizer trained here: streaming,
chat rendering and history, the <think> display, sampling options reaching the inference core, and one-line
errors for bad input. Most runs use the real nanoseek.inference.generate; a scripted stand-in fixes the tokens
where the exact streamed text matters."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

import nanoseek.inference.cli as icli
from nanoseek import DeepSeekV3, ModelConfig, Tokenizer
from nanoseek.cli import main
from nanoseek.hf import load_pretrained, save_pretrained
from nanoseek.inference import generate
from nanoseek.inference.cli import ThinkDisplay, check_prompt_length, format_summary, validate_sampling

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# R1's chat format in brief (SPEC §9): bos + system, `<｜User｜>` turns, earlier replies cut to what follows
# `</think>`, and a generation prompt that opens the reasoning block.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' ~ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' ~ (m['content'].split('</think>') | last) ~ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello model!",
          "DeepSeek uses multi-head latent attention and mixture of experts.",
          "Numbers 0123456789 and symbols: ()[]{}<>;,.!?"] * 20


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to other processes' load on a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_tokenizer() -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    # as in R1's tokenizer.json: role and reasoning markers are added tokens that decoding does not skip
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")])
    return Tokenizer(tok, {"bos_token": BOS, "eos_token": EOS}, chat_template=TEMPLATE)


def _config(tokenizer: Tokenizer, **changes) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size, **changes)


def _save(root, tokenizer, config, with_tokenizer=True):
    torch.manual_seed(0)
    model = DeepSeekV3(config)
    save_pretrained(model, root)
    if with_tokenizer:
        tokenizer.save(root)
    return str(root)


@pytest.fixture(scope="module")
def tok():
    return _tiny_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    return _save(tmp_path_factory.mktemp("ckpt") / "tiny", tok, _config(tok))


@pytest.fixture(scope="module")
def ckpt_no_mtp(tmp_path_factory, tok):
    return _save(tmp_path_factory.mktemp("ckpt") / "nomtp", tok, _config(tok, num_nextn_predict_layers=0))


@pytest.fixture(scope="module")
def ckpt_no_tokenizer(tmp_path_factory, tok):
    return _save(tmp_path_factory.mktemp("ckpt") / "notok", tok, _config(tok), with_tokenizer=False)


def _reference(ckpt, tok, prompt_ids, max_new, **kw):
    """What the CLI should print: the core's tokens up to the stop token, decoded."""
    model = load_pretrained(ckpt)
    out = generate(model, [prompt_ids], max_new, stop_tokens=(tok.eos_token_id,), **kw).tokens[0]
    if out and out[-1] == tok.eos_token_id:
        out = out[:-1]
    return tok.decode(out, skip_special_tokens=True)


class Scripted:
    """A stand-in for nanoseek.inference.generate that emits fixed tokens, one call per step, and records what
    it was asked and what stdout held after each step."""

    def __init__(self, replies, capsys=None):
        self.replies = list(replies)
        self.calls = []
        self.capsys = capsys
        self.seen = []

    def __call__(self, model, prompts, max_new_tokens, **kw):
        self.calls.append(SimpleNamespace(prompts=prompts, max_new_tokens=max_new_tokens, **kw))
        reply = self.replies.pop(0)
        for t in reply:
            kw["on_tokens"]([[t]])
            if self.capsys is not None:
                self.seen.append(self.capsys.readouterr().out)
        stats = SimpleNamespace(prefill_tokens_per_s=100.0, decode_tokens_per_s=10.0, cache_bytes=2**20,
                                drafted=4, accepted=3, acceptance_rate=0.75)
        return SimpleNamespace(tokens=[list(reply)], stats=stats)


def _use(monkeypatch, fake):
    monkeypatch.setattr(icli, "_core_generate", lambda: fake)


# ------------------------------------------------------------------------------------------- generate
def test_generate_chat_prompt_streams_the_core_output(ckpt, tok, capsys):
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "Hello world", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello world"}], add_generation_prompt=True)
    assert out == _reference(ckpt, tok, ids, 12) + "\n"
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("[nanoseek]") and f"{len(ids)} prompt" in summary and "tok/s" in summary
    assert "MTP acceptance n/a" in summary and "cache" in summary


def test_generate_raw_and_stdin_prompt(ckpt, tok, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The quick brown"))
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "-", "--raw", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out == _reference(ckpt, tok, tok.encode("The quick brown", add_bos=True), 6) + "\n"


def test_generate_sampling_is_seeded(ckpt, capsys):
    args = ["generate", "--checkpoint", ckpt, "--prompt", "hi", "--max-new-tokens", "10", "--temperature", "1.5",
            "--top-k", "50", "--top-p", "0.95"]
    outs = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]


def test_generate_threads_option(ckpt, capsys):
    torch.set_num_threads(2)
    try:
        assert main(["generate", "--checkpoint", ckpt, "--prompt", "hi", "--max-new-tokens", "2", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


def test_generate_compile_option_reaches_the_core(ckpt, capsys, monkeypatch):
    fake = Scripted([])
    _use(monkeypatch, fake)
    for extra, want in (([], False), (["--compile"], True)):
        fake.replies.append([5, 6])
        assert main(["generate", "--checkpoint", ckpt, "--prompt", "hi", "--max-new-tokens", "2", *extra]) == 0
        assert fake.calls[-1].compile is want


def test_generate_speculative_greedy_equals_plain(ckpt, capsys):
    args = ["generate", "--checkpoint", ckpt, "--prompt", "Hello", "--max-new-tokens", "10"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative"]) == 0
    out, err = capsys.readouterr()
    assert out == plain
    assert "MTP acceptance" in err and "n/a" not in err and "drafts)" in err


def test_greedy_with_top_p_or_top_k_warns_that_they_are_ignored(ckpt, capsys):
    """--top-p / --top-k without a temperature: the output is the greedy one, and a warning says they did nothing."""
    args = ["generate", "--checkpoint", ckpt, "--prompt", "Hello", "--max-new-tokens", "5"]
    assert main(args) == 0
    greedy, err = capsys.readouterr()
    assert "warning" not in err
    for extra in (["--top-p", "0.5"], ["--top-k", "3"]):
        assert main([*args, *extra]) == 0
        out, err = capsys.readouterr()
        assert out == greedy
        assert [line for line in err.splitlines() if "warning" in line] == [
            "nanoseek generate: warning: --top-p / --top-k apply to sampling only: greedy decoding (--temperature 0, "
            "the default) ignores them"]
    assert main([*args, "--top-k", "3", "--temperature", "0.7"]) == 0
    assert "warning" not in capsys.readouterr().err


# DeepSeek-V3's generation_config.json, as published
V3_GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                        "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.46.3"}
FROM_FILE = "sampling settings from generation_config.json: "


def _with_generation_config(ckpt, root: Path, content) -> str:
    """A copy of the checkpoint ``ckpt`` in ``root`` with a generation_config.json holding ``content`` (a dict, or
    the file's text)."""
    root.mkdir()
    for f in Path(ckpt).iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    (root / "generation_config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return str(root)


def _sampling_run(monkeypatch, capsys, root, *extra, command="generate"):
    """(temperature, top_k, top_p) the core was asked for, and the stderr lines that mention the file or warn."""
    fake = Scripted([[5]])
    _use(monkeypatch, fake)
    if command == "chat":
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
        args = ["chat", "--checkpoint", root, "--max-new-tokens", "2", *extra]
    else:
        args = ["generate", "--checkpoint", root, "--prompt", "hi", "--max-new-tokens", "2", *extra]
    assert main(args) == 0
    call = fake.calls[0]
    err = capsys.readouterr().err
    return (call.temperature, call.top_k, call.top_p), [l for l in err.splitlines() if "generation_config" in l
                                                        or "warning" in l]


@pytest.mark.parametrize("extra, sampling, line", [
    ([], (0.6, 50, 0.95), "temperature 0.6, top-p 0.95, top-k 50 (transformers' default); --temperature 0 for greedy"),
    (["--temperature", "0"], (0.0, None, None), None),  # greedy: the file's top-p / top-k do nothing, not taken
    (["--temperature", "0.8", "--top-k", "5"], (0.8, 5, 0.95), "top-p 0.95"),
    (["--top-p", "0.5"], (0.6, 50, 0.5), "temperature 0.6, top-k 50 (transformers' default); --temperature 0 for "
                                         "greedy"),
    (["--temperature", "0.7", "--top-p", "0.9", "--top-k", "3"], (0.7, 3, 0.9), None),
])
def test_generation_config_json_gives_the_sampling_defaults(ckpt, tmp_path, capsys, monkeypatch, extra, sampling,
                                                            line):
    """DeepSeek-V3's file samples (as transformers' generate does with it); an option given always wins, and one
    stderr line says what came from the file."""
    root = _with_generation_config(ckpt, tmp_path / "v3", V3_GENERATION_CONFIG)
    got, lines = _sampling_run(monkeypatch, capsys, root, *extra)
    assert got == sampling
    assert lines == ([] if line is None else ["nanoseek generate: " + FROM_FILE + line])


@pytest.mark.parametrize("config, extra, sampling, lines", [
    ({"do_sample": False, "temperature": 0.6, "top_k": 5}, [], (0.0, None, None), []),
    ({"temperature": 0.6, "top_p": 0.9}, [], (0.0, None, None), []),  # no do_sample: greedy, as in transformers
    ({"do_sample": True}, [], (1.0, 50, None),
     [FROM_FILE + "temperature 1 (transformers' default), top-k 50 (transformers' default); --temperature 0 for "
                  "greedy"]),
    ({"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0}, [], (0.7, None, None),  # both off
     [FROM_FILE + "temperature 0.7; --temperature 0 for greedy"]),
    ({"do_sample": True, "temperature": None, "top_k": 20}, [], (1.0, 20, None),  # null = absent
     [FROM_FILE + "temperature 1 (transformers' default), top-k 20; --temperature 0 for greedy"]),
    # the greedy warning is about the options given, not about the file's
    ({"do_sample": True, "top_k": 20, "top_p": 0.5}, ["--temperature", "0"], (0.0, None, None), []),
    ({"do_sample": True, "top_k": 20}, ["--temperature", "0", "--top-k", "3"], (0.0, 3, None),
     ["warning: --top-p / --top-k apply to sampling only: greedy decoding (--temperature 0) ignores them"]),
    ({"do_sample": False, "top_k": 20}, ["--top-k", "3"], (0.0, 3, None),
     ["warning: --top-p / --top-k apply to sampling only: greedy decoding (--temperature 0, the default) ignores "
      "them"]),
])
def test_generation_config_json_variants(ckpt, tmp_path, capsys, monkeypatch, config, extra, sampling, lines):
    root = _with_generation_config(ckpt, tmp_path / "gc", config)
    got, said = _sampling_run(monkeypatch, capsys, root, *extra)
    assert got == sampling
    assert said == ["nanoseek generate: " + line for line in lines]


def test_chat_takes_its_sampling_defaults_from_generation_config_json(ckpt, tmp_path, capsys, monkeypatch):
    root = _with_generation_config(ckpt, tmp_path / "v3", V3_GENERATION_CONFIG)
    got, lines = _sampling_run(monkeypatch, capsys, root, command="chat")
    assert got == (0.6, 50, 0.95)
    assert lines == ["nanoseek chat: " + FROM_FILE + "temperature 0.6, top-p 0.95, top-k 50 (transformers' default); "
                     "--temperature 0 for greedy"]
    got, lines = _sampling_run(monkeypatch, capsys, root, "--temperature", "0", command="chat")
    assert got == (0.0, None, None) and lines == []


def test_generation_config_eos_token_ids_stop_generation(ckpt, tok, tmp_path, capsys, monkeypatch):
    stop = tok.encode("!")[0]
    assert stop not in (tok.eos_token_id, *icli._stop_tokens(tok, load_pretrained(ckpt)))
    for n, eos in enumerate(([tok.eos_token_id, stop], stop)):  # a list, or one id
        root = _with_generation_config(ckpt, tmp_path / f"eos{n}", {"eos_token_id": eos})
        fake = Scripted([[*tok.encode("ok"), stop, *tok.encode("after")]])
        _use(monkeypatch, fake)
        assert main(["generate", "--checkpoint", root, "--prompt", "hi", "--max-new-tokens", "9"]) == 0
        assert capsys.readouterr().out == "ok\n"
        assert stop in fake.calls[0].stop_tokens and tok.eos_token_id in fake.calls[0].stop_tokens


@pytest.mark.parametrize("content, message", [
    ("{not json", "generation_config.json is not valid JSON"),
    ("[1, 2]", "generation_config.json must hold a JSON object, got list"),
    ({"do_sample": "yes"}, "generation_config.json: do_sample must be true or false, got 'yes'"),
    ({"do_sample": True, "temperature": 0}, "generation_config.json: temperature must be a number > 0"),
    ({"do_sample": True, "temperature": "0.6"}, "generation_config.json: temperature must be a number > 0"),
    ('{"do_sample": true, "temperature": NaN}', "generation_config.json: temperature must be a number > 0"),
    ({"do_sample": True, "top_p": 1.5}, "generation_config.json: top_p must be a number in (0, 1], got 1.5"),
    ({"do_sample": True, "top_p": 0}, "generation_config.json: top_p must be a number in (0, 1], got 0"),
    ({"do_sample": True, "top_k": 2.5}, "generation_config.json: top_k must be an integer >= 0"),
    ({"do_sample": True, "top_k": -1}, "generation_config.json: top_k must be an integer >= 0"),
    ({"eos_token_id": "</s>"}, "generation_config.json: eos_token_id must be a token id or a list of token ids"),
    ({"eos_token_id": [1, None]}, "generation_config.json: eos_token_id must be a token id or a list of token ids"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_malformed_generation_config_json_is_one_line(ckpt, tmp_path, capsys, monkeypatch, content, message,
                                                        command):
    root = _with_generation_config(ckpt, tmp_path / "bad", content)
    monkeypatch.setattr(icli, "_core_generate", lambda: pytest.fail("generated"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, "--checkpoint", root, *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"nanoseek {command}: error: {Path(root) / 'generation_config.json'}") and message in err


def test_speculative_without_mtp_warns_and_decodes_plainly(ckpt_no_mtp, capsys):
    args = ["generate", "--checkpoint", ckpt_no_mtp, "--prompt", "Hello", "--max-new-tokens", "5"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative"]) == 0
    out, err = capsys.readouterr()
    assert out == plain
    warning = [line for line in err.splitlines() if "warning" in line]
    assert warning == ["nanoseek generate: warning: the checkpoint has no MTP module: speculative decoding is off, "
                       "decoding plainly"]
    assert "Traceback" not in err


def test_generate_streams_each_step_and_never_splits_a_character(ckpt, tok, capsys, monkeypatch):
    text = "Hé 😀 ok"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the emoji is spread over byte tokens
    fake = Scripted([[*ids, tok.eos_token_id, *tok.encode("after the stop")]], capsys)
    _use(monkeypatch, fake)
    args = ["generate", "--checkpoint", ckpt, "--prompt", "x", "--max-new-tokens", "40", "--temperature", "0.7",
            "--top-k", "5", "--top-p", "0.9", "--seed", "7", "--speculative"]
    assert main(args) == 0
    assert "".join(fake.seen) == text  # streamed while generating, nothing after the stop token
    assert sum(1 for piece in fake.seen if piece) >= 3 and all("\ufffd" not in p for p in fake.seen)
    out, err = capsys.readouterr()
    assert out == "\n"  # the closing newline, after the stream
    assert "MTP acceptance 75.0% (3/4 drafts)" in err and "decode 10.0 tok/s" in err
    call = fake.calls[0]
    assert (call.temperature, call.top_k, call.top_p, call.seed, call.speculative) == (0.7, 5, 0.9, 7, True)
    assert tok.eos_token_id in call.stop_tokens and call.max_new_tokens == 40
    assert call.prompts == [tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)]
    assert tok.decode(call.prompts[0]).endswith("<｜Assistant｜><think>\n")


def test_every_eos_id_of_the_config_stops_generation():
    tokenizer = SimpleNamespace(eos_token_id=1)
    model = SimpleNamespace(config=ModelConfig.preset("tiny").replace(eos_token_id=(7, 1, 9)))
    assert icli._stop_tokens(tokenizer, model) == (1, 7, 9)
    assert icli._stop_tokens(tokenizer, model, (9, 4, 1)) == (1, 7, 9, 4)  # generation_config.json's


def test_generate_system_prompt_and_context_clamp(ckpt, tok, capsys, monkeypatch):
    fake = Scripted([tok.encode("ok")])
    _use(monkeypatch, fake)
    def length(words):
        return len(tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": words}], add_generation_prompt=True))

    words = "hello"
    while length(words + " hello") < 500:  # the tiny preset's context is 512
        words += " hello"
    n = length(words)
    assert main(["generate", "--checkpoint", ckpt, "--prompt", words, "--system", "Be brief.",
                 "--max-new-tokens", "100"]) == 0
    err = capsys.readouterr().err
    assert f"--max-new-tokens 100 lowered to {512 - n}" in err
    assert fake.calls[0].max_new_tokens == 512 - n
    assert tok.decode(fake.calls[0].prompts[0]).startswith(BOS + "Be brief.<｜User｜>hello")


@pytest.mark.parametrize("extra, message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "  \n "], "the prompt is empty"),
    (["--prompt", "hi", "--temperature", "-0.5"], "temperature must be a finite number >= 0"),
    (["--prompt", "hi", "--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--top-k", "0"], "top_k must be a positive integer"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--prompt", "hello " * 600], "leaves no room in the model's context of 512 tokens"),
    (["--prompt", "hi", "--device", "nonsense"], "invalid --device"),
    (["--prompt", "hi", "--threads", "0"], "--threads must be a positive integer"),
    (["--prompt", "abc\udcff"], "the text is not valid UTF-8: '\\udcff' at character 3"),  # byte 0xff in argv
    (["--prompt", "hi", "--device", "meta"], "--device meta holds no data"),
])
def test_generate_bad_input_is_one_line(ckpt, capsys, extra, message):
    assert main(["generate", "--checkpoint", ckpt, *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("nanoseek generate: error: ") and message in err


def test_raw_accepts_a_prompt_of_whitespace(ckpt, tok, capsys, monkeypatch):
    """Indentation and blank lines are text with --raw (the start of a code block); the empty prompt is not."""
    fake = Scripted([[5], [5]])
    _use(monkeypatch, fake)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\t\n"))
    for prompt, text in (("\n\n    ", "\n\n    "), ("-", "\t\n")):
        assert main(["generate", "--checkpoint", ckpt, "--prompt", prompt, "--raw", "--max-new-tokens", "2"]) == 0
        assert fake.calls[-1].prompts == [tok.encode(text, add_bos=True)]
    assert len(fake.calls[-1].prompts[0]) > 1
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    whitespace = "the prompt is empty (only whitespace; --raw feeds it as it is)"
    for prompt, mode, message in (("", "--raw", "the prompt is empty"), ("-", "--raw", "the prompt is empty"),
                                  ("  \n", "--chat", whitespace), ("  \n", None, whitespace)):
        assert main(["generate", "--checkpoint", ckpt, "--prompt", prompt, *([mode] if mode else [])]) == 2
        assert capsys.readouterr().err == f"nanoseek generate: error: {message}\n"


@pytest.mark.parametrize("mode", ["--chat", "--raw"])
def test_a_prompt_that_is_not_utf8_is_named_at_its_place_before_loading(ckpt, capsys, monkeypatch, mode):
    """Byte 0xff in argv: the error gives its place in the prompt, not in the rendered chat prompt, and comes
    before the (possibly large) model is loaded."""
    monkeypatch.setattr(icli, "load_for_inference", lambda args: pytest.fail("the model was loaded"))
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "abc\udcff", mode]) == 2
    assert capsys.readouterr().err == "nanoseek generate: error: the text is not valid UTF-8: '\\udcff' at character 3\n"


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_missing_checkpoint_or_tokenizer_is_one_line(ckpt_no_tokenizer, tmp_path, capsys, command, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, "--checkpoint", str(tmp_path / "missing"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main([command, "--checkpoint", ckpt_no_tokenizer, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"nanoseek {command}: error:" in err and "no tokenizer.json" in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_missing_tokenizer_config_is_one_line(ckpt, tmp_path, capsys, command, monkeypatch):
    """Without tokenizer_config.json the tokenizer would load with no bos token and no chat template: refused."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_bytes((Path(ckpt) / name).read_bytes())
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, "--checkpoint", str(tmp_path), *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"nanoseek {command}: error: {tmp_path} has no tokenizer_config.json")


def test_validate_sampling_and_prompt_length():
    validate_sampling(temperature=0, top_k=1, top_p=1.0, max_new_tokens=1)
    validate_sampling(temperature=0.6, top_p=0.95)
    for kw in (dict(temperature=-1), dict(temperature=float("inf")), dict(top_k=0), dict(top_k=2.5),
               dict(top_p=0.0), dict(top_p=1.01), dict(max_new_tokens=0), dict(max_new_tokens=True)):
        with pytest.raises(ValueError):
            validate_sampling(**kw)
    assert check_prompt_length(10, 100, 512) == 100
    assert check_prompt_length(500, 100, 512) == 12
    for n in (0, 512, 600):
        with pytest.raises(ValueError):
            check_prompt_length(n, 10, 512)


# ------------------------------------------------------------------------------------------- chat
def test_chat_history_reset_exit_and_think_markers(ckpt, tok, capsys, monkeypatch):
    eos = tok.eos_token_id
    fake = Scripted([[*tok.encode("hmm</think>Hello!"), eos], [*tok.encode("so</think>Again."), eos],
                     [*tok.encode("x</think>Fresh."), eos]])
    _use(monkeypatch, fake)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nmore\n/reset\nnew\n/help\n/exit\nnever read\n"))
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert main(["chat", "--checkpoint", ckpt, "--system", "Sys."]) == 0
    out, err = capsys.readouterr()
    assert out == ("[think]hmm[/think]Hello!\n[think]so[/think]Again.\n[conversation reset]\n"
                   "[think]x[/think]Fresh.\n")
    prompts = [tok.decode(c.prompts[0]) for c in fake.calls]
    assert prompts == [
        BOS + "Sys.<｜User｜>hi<｜Assistant｜><think>\n",
        BOS + "Sys.<｜User｜>hi<｜Assistant｜>Hello!" + EOS + "<｜User｜>more<｜Assistant｜><think>\n",  # reasoning dropped
        BOS + "Sys.<｜User｜>new<｜Assistant｜><think>\n",  # after /reset
    ]
    assert "unknown command /help" in err and err.count("[nanoseek]") == 3 and "Traceback" not in err


def test_chat_on_a_terminal_dims_the_reasoning(ckpt, tok, capsys, monkeypatch):
    fake = Scripted([[*tok.encode("hmm</think>Hi."), tok.eos_token_id]])
    _use(monkeypatch, fake)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["chat", "--checkpoint", ckpt]) == 0
    assert capsys.readouterr().out == "\x1b[2mhmm\x1b[0mHi.\n"


def test_chat_warns_when_the_context_lowers_max_new_tokens(ckpt, tok, capsys, monkeypatch):
    """As generate does: one warning for each reply that the model's context (512 here) cuts short."""
    ok = [*tok.encode("ok"), tok.eos_token_id]
    fake = Scripted([ok, ok, ok])
    _use(monkeypatch, fake)

    def length(*turns):
        messages = [{"role": "assistant" if i % 2 else "user", "content": t} for i, t in enumerate(turns)]
        return len(tok.apply_chat_template(messages, add_generation_prompt=True))

    words = "hello"
    while length("hi", "ok", words + " hello") < 500:
        words += " hello"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"hi\n{words}\n/reset\n{words}\n"))
    assert main(["chat", "--checkpoint", ckpt, "--max-new-tokens", "100"]) == 0
    err = capsys.readouterr().err
    n2, n3 = length("hi", "ok", words), length(words)  # the second turn's conversation, the one after /reset
    assert [c.max_new_tokens for c in fake.calls] == [100, 512 - n2, 512 - n3]
    assert [line for line in err.splitlines() if "warning" in line] == [
        f"nanoseek chat: warning: --max-new-tokens 100 lowered to {512 - n}: the conversation is {n} tokens and the "
        "model's context is 512" for n in (n2, n3)]


def test_chat_with_the_real_core_and_a_too_long_turn(ckpt, tok, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n" + "hello " * 600 + "\nbad \udcff byte\nshort\n"))
    assert main(["chat", "--checkpoint", ckpt, "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    # said at its place in the line (the line never joined the history: no /reset needed), and the chat went on
    assert "nanoseek chat: error: the text is not valid UTF-8: '\\udcff' at character 4\n" in err
    first = _reference(ckpt, tok, tok.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                                          add_generation_prompt=True), 6)
    assert out.startswith("[think]" + first.replace("<think>", "[think]").replace("</think>", "[/think]"))
    assert "leaves no room in the model's context" in err and "/reset" in err
    assert err.count("[nanoseek]") == 2  # the long turn and the undecodable one were skipped, the chat went on


def test_think_display_handles_tags_split_across_chunks():
    out = io.StringIO()
    d = ThinkDisplay(out, color=False)
    for piece in ["a<th", "ink>b", "c</", "think", ">d <", "x"]:
        d.write(piece)
    d.close()
    assert out.getvalue() == "a[think]bc[/think]d <x"
    for color, expected in ((True, "\x1b[2mnever closed\x1b[0m"), (False, "[think]never closed[/think]")):
        out = io.StringIO()
        d = ThinkDisplay(out, color=color, thinking=True)
        d.write("never closed")
        d.close()
        assert out.getvalue() == expected


def test_format_summary_without_speculation():
    line = format_summary({"prefill_tokens_per_s": 12.34, "decode_tokens_per_s": 5.0, "cache_bytes": 3 * 2**20,
                           "acceptance_rate": None}, 7, 3, speculative=False)
    assert line == ("[nanoseek] 7 prompt + 3 new tokens | prefill 12.3 tok/s | decode 5.0 tok/s | "
                    "MTP acceptance n/a (not speculative) | cache 3.00 MiB")
    line = format_summary({"prefill_tokens_per_s": 12.34, "decode_tokens_per_s": 5.0, "cache_bytes": 3 * 2**20,
                           "compiled": True, "first_step_s": 4.25}, 7, 3, speculative=False)
    assert "| decode 5.0 tok/s | first step 4.2 s (compiled, not in the decode rate) | MTP" in line
    # one new token (the context was nearly full): no decoding step, nothing drafted
    line = format_summary({"prefill_tokens_per_s": 12.34, "decode_tokens_per_s": 0.0, "acceptance_rate": 0.0,
                           "drafted": 0, "accepted": 0}, 7, 1, speculative=True)
    assert line == ("[nanoseek] 7 prompt + 1 new tokens | prefill 12.3 tok/s | decode n/a (no token after the first) "
                    "| MTP acceptance n/a (nothing drafted)")


# ------------------------------------------------------------------------------------------- process
def test_python_m_nanoseek_generate(ckpt, tok):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nanoseek", "generate", "--checkpoint", ckpt, "--prompt", "Hello",
                           "--max-new-tokens", "8", "--raw"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _reference(ckpt, tok, tok.encode("Hello", add_bos=True), 8) + "\n"
    assert proc.stderr.strip().splitlines()[-1].startswith("[nanoseek] ")
    config = json.loads(open(os.path.join(ckpt, "config.json")).read())
    assert config["vocab_size"] == tok.vocab_size
