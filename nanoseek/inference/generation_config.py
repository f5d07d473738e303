"""A checkpoint's ``generation_config.json``: the sampling settings and stop tokens transformers' ``generate``
starts from (DeepSeek-V3 and R1 ship ``do_sample: true, temperature: 0.6, top_p: 0.95``).

Only the fields nanoseek uses are read: ``do_sample``, ``temperature``, ``top_p``, ``top_k`` and
``eos_token_id``; a JSON null counts as absent, as in transformers. A bad value is a ``ValueError`` naming the
file and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import read_json_object

GENERATION_CONFIG_FILE = "generation_config.json"

# What transformers samples with when the file sets do_sample but leaves these out. Checked in transformers 5.24:
# GenerationMixin._prepare_generation_config fills every field that neither the call nor the file set from
# GenerationConfig._get_default_generation_params() (temperature 1.0, top_k 50, top_p 1.0), and sampling then
# adds TopKLogitsWarper(50) (GenerationMixin._get_logits_processor). So a file without top_k samples from the 50
# most likely tokens, not from all of them; a top_k of 0 in the file turns top-k off (no warper for 0).
HF_DEFAULT_TEMPERATURE = 1.0
HF_DEFAULT_TOP_K = 50


@dataclass(frozen=True)
class GenerationConfig:
    """What a checkpoint's generation_config.json asks for. ``sampling`` holds the file's ``temperature``,
    ``top_p`` and ``top_k`` (those present) when it sets ``do_sample: true``, and is None otherwise (greedy);
    ``eos_token_ids`` are its stop tokens."""

    sampling: dict[str, Any] | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# field -> (the check, what a good value is)
_CHECKS = {
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a number > 0 (do_sample false means greedy)"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_token_id(v), "an integer >= 0 (0 = no top-k)"),
    "eos_token_id": (lambda v: _is_token_id(v) or (isinstance(v, list) and all(_is_token_id(i) for i in v)),
                     "a token id or a list of token ids"),
}


def _field(raw: dict, name: str, path: Path) -> Any:
    value = raw.get(name)
    check, what = _CHECKS[name]
    if value is not None and not check(value):
        raise ValueError(f"{path}: {name} must be {what}, got {value!r}")
    return value


def read_generation_config(directory: str | Path) -> GenerationConfig:
    """The generation_config.json in ``directory``; an empty GenerationConfig (greedy, no stop tokens) without
    one. Sampling fields are checked only when ``do_sample`` is true, the only case they are used in."""
    path = Path(directory) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return GenerationConfig()
    raw = read_json_object(path)
    eos = _field(raw, "eos_token_id", path)
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    if not _field(raw, "do_sample", path):
        return GenerationConfig(eos_token_ids=eos_ids)
    sampling = {name: _field(raw, name, path) for name in ("temperature", "top_p", "top_k")}
    return GenerationConfig({k: v for k, v in sampling.items() if v is not None}, eos_ids)
