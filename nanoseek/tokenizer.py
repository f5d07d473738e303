"""The checkpoint's tokenizer and chat format (SPEC §9), without transformers.

:class:`Tokenizer` reads a Hugging Face ``tokenizer.json`` with the ``tokenizers`` library (DeepSeek-V3/R1:
byte-level BPE, bos ``<｜begin▁of▁sentence｜>`` id 0, eos ``<｜end▁of▁sentence｜>`` id 1) and the
``tokenizer_config.json`` beside it (special tokens, the Jinja ``chat_template``). Token ids are those of
``tokenizers.Tokenizer.encode(text, add_special_tokens=False)`` on the same file, and the chat prompt is the one
transformers' ``apply_chat_template(..., tokenize=False)`` renders: the same sandboxed Jinja environment (a
template is untrusted input), globals, filters and message normalisation.

:class:`StreamDecoder` turns token ids into text as they arrive without ever splitting a multi-byte UTF-8
character that spans several byte-level tokens.
"""

from __future__ import annotations

import copy
import json
import numbers
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers

from .atomic import atomic_copy, atomic_path, atomic_write_json
from .config import read_json_object

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.47 saves the template here
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # named templates, one ``NAME.jinja`` each
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"  # legacy
# Everything :meth:`Tokenizer.save` carries next to a checkpoint (those that exist).
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, SPECIAL_TOKENS_MAP_FILE)
REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """Missing or malformed tokenizer files, or a chat template that cannot be rendered."""


def check_text(text: str) -> str:
    """``text`` if it is a str of valid Unicode. Bytes that are not UTF-8 reach Python's command line and stdin
    as lone surrogates (U+DC80-U+DCFF), which no tokenizer can encode."""
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"the text is not valid UTF-8: {text[e.start:e.end]!a} at character {e.start}") from None
    return text


def token_ids(ids: Any, what: str) -> list[int]:
    """``ids`` (an int, a list of ints, a 1-D tensor or array) as a list of Python ints; TypeError naming ``what``
    for a string (whose characters int() would read as ids), fractional numbers or nested lists."""
    if hasattr(ids, "tolist") and not isinstance(ids, (str, bytes)):
        ids = ids.tolist()  # a tensor or numpy array: its ids, or one id for a 0-d one
    if isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
        return [int(ids)]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{what} takes token ids (ints), got {type(ids).__name__}")
    ids = list(ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"{what} takes token ids (ints), got {i!r}")
    return [int(i) for i in ids]


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise TokenizerError(str(e)) from None


def copy_chat_template_files(src: Path, dst: Path) -> None:
    """The chat template files of the tokenizer directory ``src`` (``chat_template.jinja`` and the named templates
    of ``additional_chat_templates/``, those that exist) into ``dst``, each atomically."""
    if (src / CHAT_TEMPLATE_FILE).is_file():
        atomic_copy(src / CHAT_TEMPLATE_FILE, dst / CHAT_TEMPLATE_FILE)
    if (src / CHAT_TEMPLATE_DIR).is_dir():
        shutil.copytree(src / CHAT_TEMPLATE_DIR, dst / CHAT_TEMPLATE_DIR, dirs_exist_ok=True, copy_function=atomic_copy)


class Tokenizer:
    """A checkpoint's tokenizer: encode / decode / stream-decode, and its chat template.

    Build one with :meth:`from_pretrained` (a directory holding ``tokenizer.json`` and usually
    ``tokenizer_config.json``), or directly from a ``tokenizers.Tokenizer`` plus the tokenizer_config dict.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None,
                 chat_template: str | Mapping[str, str] | None = None, *, source: str | os.PathLike | None = None):
        self._tok = tokenizer
        self.config: dict[str, Any] = dict(config or {})
        if chat_template is None:
            chat_template = _template_from_config(self.config.get("chat_template"))
        self._chat_template: str | dict[str, str] | None = (
            dict(chat_template) if isinstance(chat_template, Mapping) else chat_template)
        self._source = Path(source) if source is not None else None
        # special tokens: tokenizer_config.json's (from_pretrained merges special_tokens_map.json in)
        self.special_tokens: dict[str, str] = {}
        for key, value in self.config.items():
            if key.endswith("_token") and (content := _token_content(value)) is not None:
                self.special_tokens[key] = content
        # (config, chat template) as read from source: save copies source's files while they are unchanged
        self._as_loaded = None if source is None else (copy.deepcopy(self.config), copy.deepcopy(self._chat_template))

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``,
        ``additional_chat_templates/*.jinja``, ``special_tokens_map.json`` where present) from a directory,
        e.g. a checkpoint. Raises :class:`TokenizerError` (a ``ValueError``) naming what is missing."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        if path.is_file():
            path = path.parent
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise TokenizerError(
                f"{path} has no {TOKENIZER_FILE}: copy the tokenizer files (tokenizer.json, tokenizer_config.json) "
                "of the checkpoint's model next to its weights (nanoseek.Tokenizer.save does this)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side reports malformed files as a plain Exception
            raise TokenizerError(f"cannot read {file}: {e}") from None
        config_file = path / TOKENIZER_CONFIG_FILE
        config = _read_json(config_file) if config_file.is_file() else {}
        legacy = path / SPECIAL_TOKENS_MAP_FILE
        if legacy.is_file() and "added_tokens_decoder" not in config:
            # as transformers reads it: a tokenizer_config.json without added_tokens_decoder (written before
            # transformers 4.34) takes its special tokens from special_tokens_map.json, whose values win; with one,
            # the legacy file is not read
            for key, value in _read_json(legacy).items():
                if key.endswith("_token"):
                    config[key] = value
        # separate template files take priority over the tokenizer_config.json entry, as in transformers
        templates: dict[str, str] = {}
        if (path / CHAT_TEMPLATE_FILE).is_file():
            templates["default"] = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if (path / CHAT_TEMPLATE_DIR).is_dir():
            for f in sorted((path / CHAT_TEMPLATE_DIR).glob("*.jinja")):
                templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
        template: str | dict[str, str] | None = None
        if len(templates) == 1 and "default" in templates:
            template = templates["default"]
        elif templates:
            template = templates
        return cls(tok, config, template, source=path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer files into ``path`` (created if needed; other files there are kept), e.g. next to a
        checkpoint written by :func:`nanoseek.hf.save_pretrained`. Files this tokenizer was loaded from are copied
        byte for byte while ``config`` and ``chat_template`` are as loaded; otherwise ``tokenizer.json`` and
        ``tokenizer_config.json`` (which then holds the chat template) are serialised."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        src = self._source
        unchanged = self._as_loaded == (self.config, self._chat_template)
        if unchanged and src is not None and src.resolve() == path.resolve():
            return path
        if unchanged and src is not None and (src / TOKENIZER_FILE).is_file():
            for name in TOKENIZER_FILES:
                if (src / name).is_file() and name != CHAT_TEMPLATE_FILE:
                    atomic_copy(src / name, path / name)
            copy_chat_template_files(src, path)
            if not (src / TOKENIZER_CONFIG_FILE).is_file() and self.config:
                self._write_config(path)
            return path
        with atomic_path(path / TOKENIZER_FILE) as tmp:
            self._tok.save(str(tmp))
        self._write_config(path)
        # template files there would win over tokenizer_config.json's chat_template when read back
        (path / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
        for f in (path / CHAT_TEMPLATE_DIR).glob("*.jinja"):
            f.unlink()
        return path

    def _write_config(self, path: Path) -> None:
        config = dict(self.config)
        config.pop("chat_template", None)  # the loaded one, unless chat_template was set to None since
        if isinstance(self._chat_template, str):
            config["chat_template"] = self._chat_template
        elif isinstance(self._chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self._chat_template.items()]
        atomic_write_json(path / TOKENIZER_CONFIG_FILE, config, ensure_ascii=False)

    # ------------------------------------------------------------------ vocabulary
    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (DeepSeek-V3: 128000 BPE + 815 added = 128815 used ids)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def _special(self, name: str) -> str | None:
        return self.special_tokens.get(name)

    @property
    def bos_token(self) -> str | None:
        return self._special("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens (bos_token, eos_token, ...) as transformers passes them to a chat template."""
        return dict(self.special_tokens)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, add_special_tokens: bool = False, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``: exactly ``tokenizers.Tokenizer.encode(text, add_special_tokens=...).ids`` on the
        same tokenizer.json. Special tokens written in the text (``<｜User｜>``) become their ids.
        ``add_bos`` prepends the bos id unless the ids already start with it."""
        ids = self._tok.encode(check_text(text), add_special_tokens=add_special_tokens).ids
        if add_bos:
            bos = self.bos_token_id
            if bos is None:
                raise TokenizerError("add_bos=True but the tokenizer has no bos_token")
            if not ids or ids[0] != bos:
                ids = [bos, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text of ``texts`` (a list of strings), as :meth:`encode` gives them."""
        if isinstance(texts, (str, bytes)):  # iterating it would encode each character as a text of its own
            raise TokenizerError(f"encode_batch takes a list of texts, got one {type(texts).__name__}: use encode")
        texts = [check_text(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (``tokenizers`` decode). A multi-byte character cut off at either end comes out as
        U+FFFD; use :meth:`stream_decoder` to decode a sequence that is still growing."""
        return self._tok.decode(token_ids(ids, "decode"), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder: feed it ids as they are generated, it returns the new text, never a partial
        UTF-8 character."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    @property
    def chat_template(self) -> str | dict[str, str] | None:
        """The checkpoint's chat template (a Jinja string, or a dict of named templates), or None."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, value: str | Mapping[str, str] | None) -> None:
        self._chat_template = dict(value) if isinstance(value, Mapping) else value

    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat_template)

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to render: ``chat_template`` (a template, or the name of one of several), else the
        checkpoint's (``tool_use`` when tools are given and there is one, else ``default``), as transformers picks."""
        own = self._chat_template
        if isinstance(own, dict):
            if chat_template is not None and chat_template in own:
                return own[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in own:
                    return own["tool_use"]
                if "default" in own:
                    return own["default"]
                raise TokenizerError(f"the tokenizer has several chat templates and no default: name one of "
                                     f"{sorted(own)}")
        if chat_template is not None:
            return chat_template
        if not own:
            raise TokenizerError("the tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja); "
                                 "use raw prompts instead")
        return own

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            tokenize: bool = True, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            **kwargs: Any) -> str | list[int]:
        """Render a conversation (``[{"role": "user", "content": "..."}, ...]``) with the checkpoint's Jinja chat
        template, as ``transformers``' ``apply_chat_template`` does (same defaults): the prompt string with
        ``tokenize=False``, else its ids (the template writes the bos itself). ``add_generation_prompt`` appends
        the assistant header (R1: ``<｜Assistant｜><think>\\n``). Extra keyword arguments reach the template."""
        template = self.get_chat_template(chat_template, tools)
        if not isinstance(messages, (list, tuple)) or not messages:
            got = "an empty list" if isinstance(messages, (list, tuple)) else f"one {type(messages).__name__}"
            raise TokenizerError(f"a chat needs at least one message: messages is a list of {{'role': ..., "
                                 f"'content': ...}} dicts, got {got}")
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    documents=documents, **{**self.special_tokens_map, **kwargs})
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        where = f", source={str(self._source)!r}" if self._source else ""
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"chat_template={'yes' if self.has_chat_template else 'no'}{where})")


def _template_from_config(value: Any) -> str | dict[str, str] | None:
    """tokenizer_config.json's ``chat_template``: a string, or a list of {"name", "template"} dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, Mapping) and "name" in t and "template" in t for t in value):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError("tokenizer_config.json chat_template must be a string or a list of "
                         "{\"name\": ..., \"template\": ...} objects")


# -------------------------------------------------------------------------- streaming
class StreamDecoder:
    """Incremental detokenization: ``push(ids)`` returns the text those ids add, holding back a trailing
    incomplete UTF-8 character (decoded as U+FFFD) until the tokens that complete it arrive; ``flush()`` returns
    whatever is still held. The concatenated output equals ``decode`` of all ids (for valid UTF-8).

    Each push decodes only a short window: the ids since the last emitted text plus the ones before them (so a
    decoder that treats the start of a sequence specially, e.g. a leading space, does not change the output).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids up to here have been turned into text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, ids: int | Iterable[int]) -> str:
        self.ids.extend(token_ids(ids, "push"))
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read >= len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing new yet, or a character still incomplete
        new = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return new

    def reset(self) -> None:
        self.ids.clear()
        self._prefix = self._read = 0


# -------------------------------------------------------------------------- chat template rendering
_ENVIRONMENT = None


def _environment():
    """The Jinja environment transformers renders chat templates in: sandboxed and immutable (a template is
    untrusted input), trim_blocks / lstrip_blocks, loop controls, ``{% generation %}`` blocks, and the
    ``raise_exception`` / ``strftime_now`` / ``dict`` / ``namespace`` globals and the ``tojson`` filter."""
    global _ENVIRONMENT
    if _ENVIRONMENT is not None:
        return _ENVIRONMENT
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendering keeps
        the body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # unlike Jinja's own tojson, no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        """``dict(...)`` without exposing the dict type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    class TemplateNamespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses dunder / private attribute names."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    _ENVIRONMENT = env
    return env


_COMPILED: dict[str, Any] = {}
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any) -> Any:
    """What a template may see: plain JSON-like data only (no objects whose methods the sandbox does not know)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return _plain(value.item())  # numpy / torch scalars
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TokenizerError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        # keys whose value is None are dropped (many templates test for a key, not for None)
        m = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = False, tools: list | None = None,
                         documents: list | None = None, **variables: Any) -> str:
    """Render a Jinja chat template the way transformers does (see :func:`_environment`). ``variables`` are the
    special tokens (``bos_token=...``) and any extra template inputs. Template errors, including
    ``raise_exception`` calls and sandbox violations, raise :class:`TokenizerError` with one line."""
    import jinja2

    env = _environment()
    try:
        compiled = _COMPILED.get(template)
        if compiled is None:
            compiled = env.from_string(template)
            if len(_COMPILED) > 16:
                _COMPILED.clear()
            _COMPILED[template] = compiled
        if tools is not None:
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise TokenizerError("tools must be JSON schemas (dicts)")
        if documents is not None:
            for document in documents:
                if not isinstance(document, Mapping):
                    raise TokenizerError("documents must be dicts with 'title' and 'text' keys")
        return compiled.render(messages=_normalize_messages(messages), tools=_plain(tools),
                               documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                               **_plain(variables))
    except jinja2.exceptions.SecurityError as e:
        raise TokenizerError(f"chat template refused by the sandbox: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template error: {e}") from None
    except TokenizerError:
        raise
    except Exception as e:  # e.g. a TypeError inside the template: still the template's fault, one line
        raise TokenizerError(f"chat template error: {type(e).__name__}: {e}") from None
