"""ModelConfig: every architectural field of DeepSeek-V3 (SPEC §1), validated, with presets and
conversion to and from transformers' ``config.json`` (model_type ``deepseek_v3`` / ``deepseek_v2``).

Field names follow the Hugging Face config so a reader can map each one to a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-V3-style model.

    Attributes mirror the Hugging Face ``DeepseekV3Config`` names, except the YaRN fields, which flatten its
    ``rope_scaling`` dict: ``rope_scaling_type`` and ``rope_factor`` are its ``type`` and ``factor``;
    ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``mscale`` and ``mscale_all_dim`` keep
    their names. ``q_lora_rank`` of ``None`` (or 0) means a plain ``q_proj`` without query compression
    (DeepSeek-V2-Lite). YaRN is active when ``rope_scaling_type == "yarn"``.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rope_theta: float = 10000.0
    rope_scaling_type: str | None = "yarn"
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    max_position_embeddings: int = 163840
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1  # a config.json list (several stop ids) is kept as a tuple
    model_type: str = "deepseek_v3"
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.q_lora_rank == 0:
            self.q_lora_rank = None
        if isinstance(self.eos_token_id, list):  # as JSON gives it back
            self.eos_token_id = tuple(self.eos_token_id) or None
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that makes the architecture impossible."""
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        non_negative = [
            "first_k_dense_replace", "n_routed_experts", "n_shared_experts", "num_nextn_predict_layers",
            "intermediate_size", "moe_intermediate_size",
        ]
        for name in non_negative:
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}")
        if self.q_lora_rank is not None and (not _is_int(self.q_lora_rank) or self.q_lora_rank < 0):
            raise ValueError(f"ModelConfig.q_lora_rank must be a non-negative integer or None, got {self.q_lora_rank!r}")
        numbers = ["routed_scaling_factor", "rope_theta", "rope_factor", "beta_fast", "beta_slow", "mscale",
                   "mscale_all_dim", "rms_norm_eps", "initializer_range"]
        for name in numbers:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"ModelConfig.{name} must be a finite number, got {value!r}")
        for name, several in (("bos_token_id", False), ("eos_token_id", True)):
            value = getattr(self, name)
            ids = value if several and isinstance(value, tuple) else (value,) if value is not None else ()
            if not all(_is_int(i) and i >= 0 for i in ids):
                kinds = "a token id (a non-negative integer), a list of them or None" if several else \
                    "a token id (a non-negative integer) or None"
                raise ValueError(f"ModelConfig.{name} must be {kinds}, got {value!r}")
        for name in ("norm_topk_prob", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.model_type not in ("deepseek_v3", "deepseek_v2"):
            raise ValueError(f"ModelConfig.model_type must be 'deepseek_v3' or 'deepseek_v2', got {self.model_type!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"ModelConfig.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            raise ValueError("ModelConfig.intermediate_size must be positive when there are dense layers "
                             f"(first_k_dense_replace={self.first_k_dense_replace}), got {self.intermediate_size}")
        if self.has_moe:
            if self.n_routed_experts <= 0:
                raise ValueError("ModelConfig.n_routed_experts must be positive when layers past "
                                 "first_k_dense_replace are MoE layers")
            if self.moe_intermediate_size <= 0:
                raise ValueError("ModelConfig.moe_intermediate_size must be positive for MoE layers")
            if self.scoring_func not in SCORING_FUNCS:
                raise ValueError(f"ModelConfig.scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
            if self.topk_method not in TOPK_METHODS:
                raise ValueError(f"ModelConfig.topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
            for name in ("n_group", "topk_group", "num_experts_per_tok"):
                value = getattr(self, name)
                if not _is_int(value) or value <= 0:
                    raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"ModelConfig.n_routed_experts ({self.n_routed_experts}) must be divisible by "
                                 f"n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                raise ValueError(f"ModelConfig.topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
            reachable = self.n_routed_experts
            if self.topk_method != "greedy":
                reachable = self.topk_group * (self.n_routed_experts // self.n_group)
            if self.num_experts_per_tok > reachable:
                raise ValueError(
                    f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) is larger than the "
                    f"{reachable} experts that topk_group={self.topk_group} of n_group={self.n_group} groups allow")
            if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2 and self.n_group > 1:
                raise ValueError("ModelConfig.topk_method 'noaux_tc' scores a group by its top-2 experts: "
                                 "n_routed_experts / n_group must be at least 2")
        if self.rope_scaling_type not in (None, "yarn"):
            raise ValueError(f"ModelConfig.rope_scaling_type must be None or 'yarn', got {self.rope_scaling_type!r}")
        if self.rope_scaling_type == "yarn":
            if not self.rope_factor >= 1.0:
                raise ValueError(f"ModelConfig.rope_factor must be >= 1 for YaRN, got {self.rope_factor}")
            if not _is_int(self.original_max_position_embeddings) or self.original_max_position_embeddings <= 0:
                raise ValueError("ModelConfig.original_max_position_embeddings must be a positive integer for YaRN, "
                                 f"got {self.original_max_position_embeddings!r}")
            if not self.beta_fast > self.beta_slow > 0:
                raise ValueError(f"ModelConfig.beta_fast ({self.beta_fast}) must be greater than beta_slow "
                                 f"({self.beta_slow}) > 0 for YaRN")
        if self.rope_theta <= 1.0:
            raise ValueError(f"ModelConfig.rope_theta must be > 1, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be positive, got {self.rms_norm_eps}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def has_moe(self) -> bool:
        return self.num_hidden_layers > self.first_k_dense_replace or (
            self.num_nextn_predict_layers > 0 and self.n_routed_experts > 0)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers ``first_k_dense_replace..`` are MoE; MTP blocks (index >= num_hidden_layers) are MoE too."""
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def yarn(self) -> bool:
        return self.rope_scaling_type == "yarn"

    @property
    def softmax_scale(self) -> float:
        """(d_h + d_h^R)^-0.5 * m(s, mscale_all_dim)^2 (SPEC §2)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale = scale * m * m
        return scale

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, source: dict[str, Any] | str | Path) -> "ModelConfig":
        """Read a transformers ``config.json`` (a dict, the file, or the directory holding it).

        Accepts the legacy ``rope_scaling`` form ({"type": "yarn", ...}, with a top-level ``rope_theta``) and
        the newer ``rope_parameters`` form ({"rope_type": "yarn", "rope_theta": ..., ...}). Raises
        ``FileNotFoundError`` (naming the path) when there is no file and ``ValueError`` for invalid JSON,
        an unsupported model, or an impossible architecture.
        """
        if not isinstance(source, (dict, str, os.PathLike)):
            hint = ": pass its .to_dict()" if hasattr(source, "to_dict") else ""  # a transformers config object
            raise TypeError(f"ModelConfig.from_hf takes a config.json dict, file or directory, got "
                            f"{type(source).__name__}{hint}")
        if not isinstance(source, dict):
            source = read_config_json(source)
        return _from_hf_dict(source)

    def to_hf(self) -> dict[str, Any]:
        """The transformers ``config.json`` dict (legacy ``rope_scaling`` plus ``rope_parameters``)."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "first_k_dense_replace": self.first_k_dense_replace,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "scoring_func": self.scoring_func,
            "topk_method": self.topk_method,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "moe_layer_freq": 1,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_cache": True,
            "dtype": "bfloat16",
            "torch_dtype": "bfloat16",  # the name transformers < 5 reads
        }
        if self.model_type == "deepseek_v3":
            d["rope_interleave"] = True
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.yarn:
            scaling = {
                "type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
                "mscale": self.mscale,
                "mscale_all_dim": self.mscale_all_dim,
            }
            d["rope_scaling"] = scaling
            rope_parameters = {"rope_type": "yarn", "rope_theta": self.rope_theta,
                               **{k: v for k, v in scaling.items() if k != "type"}}
        else:
            d["rope_scaling"] = None
            # not a RoPE parameter without YaRN, but part of the config (the length a later extension starts from)
            d["original_max_position_embeddings"] = self.original_max_position_embeddings
        d["rope_parameters"] = rope_parameters
        for key, value in self.extra.items():
            if key not in _NEVER_WRITTEN:
                d.setdefault(key, value)
        return d


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_config_json(source: str | Path) -> dict[str, Any]:
    """The JSON object in a ``config.json`` (or the directory holding one), with one-line errors."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    return read_json_object(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in a file; ``ValueError`` (one line, naming the file) for bad JSON or a non-object."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """m(s, k) = 0.1 k ln s + 1 for s > 1, else 1 (SPEC §2): the attention temperature of YaRN (arXiv 2309.00071)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------- config.json parsing
_KNOWN_HF_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
# Keys transformers writes that carry no architecture (or that we derive or check).
_IGNORED_HF_KEYS = {
    "architectures", "num_key_value_heads", "moe_layer_freq", "hidden_act", "rope_scaling", "rope_parameters",
    "attention_bias", "attention_dropout", "use_cache", "torch_dtype", "dtype", "rope_interleave", "mlp_bias",
    "transformers_version", "head_dim", "qk_head_dim", "pretraining_tp", "aux_loss_alpha", "seq_aux",
    "ep_size", "auto_map", "quantization_config", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "mlp_layer_types", "_name_or_path", "num_mtp_layers", "num_local_experts",
}
# Never carried over from ``extra`` into a written config.json (a dequantized save is not quantized).
_NEVER_WRITTEN = {"quantization_config"}

# transformers' own defaults for keys a config.json may omit (where they differ from the dataclass's V3 values).
_HF_DEFAULTS = {
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=0,
                        max_position_embeddings=4096, initializer_range=0.02),
    "deepseek_v2": dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, moe_intermediate_size=1407, n_routed_experts=64, n_shared_experts=2,
                        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                        routed_scaling_factor=1.0, n_group=1, topk_group=1, num_nextn_predict_layers=0,
                        first_k_dense_replace=0, max_position_embeddings=2048, initializer_range=0.02,
                        bos_token_id=1, eos_token_id=2),
}


def _rope_type(params: dict[str, Any]) -> str | None:
    return params.get("rope_type", params.get("type"))


def _from_hf_dict(d: dict[str, Any]) -> ModelConfig:
    model_type = d.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"config.json model_type {model_type!r} is not supported (deepseek_v3 or deepseek_v2)")
    # Features of other architectures this model cannot represent: refuse rather than load wrong weights.
    if d.get("attention_bias"):
        raise ValueError("config.json attention_bias=true is not supported (MLA projections have no bias)")
    if d.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true is not supported (the SwiGLU projections have no bias)")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act {d['hidden_act']!r} is not supported (silu)")
    if d.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"config.json moe_layer_freq {d['moe_layer_freq']!r} is not supported (every layer past "
                         "first_k_dense_replace is MoE: 1)")
    if d.get("rope_interleave") is False:
        raise ValueError("config.json rope_interleave=false is not supported (DeepSeek checkpoints rotate "
                         "interleaved pairs)")
    kwargs: dict[str, Any] = {"model_type": model_type, **_HF_DEFAULTS[model_type]}
    for alias, name in (("num_mtp_layers", "num_nextn_predict_layers"), ("num_local_experts", "n_routed_experts")):
        if alias in d and name not in d:
            kwargs[name] = d[alias]
    for key, value in d.items():
        if key in _KNOWN_HF_KEYS and key != "model_type":
            kwargs[key] = value
    # an explicit null (V2-Lite writes n_group: null); an absent key keeps transformers' default (_HF_DEFAULTS, or
    # the dataclass's, which are DeepseekV3Config's)
    for key, none_means in (("n_group", 1), ("topk_group", 1), ("n_shared_experts", 0), ("n_routed_experts", 0),
                            ("first_k_dense_replace", 0), ("num_nextn_predict_layers", 0)):
        if key in kwargs and kwargs[key] is None:
            kwargs[key] = none_means
    kwargs.update(_rope_from_hf(d))
    extra = {k: v for k, v in d.items() if k not in _KNOWN_HF_KEYS and k not in _IGNORED_HF_KEYS}
    kwargs["extra"] = extra
    try:
        return ModelConfig(**kwargs)
    except TypeError as e:  # a field of the wrong type
        raise ValueError(f"config.json: {e}") from None


def _rope_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """RoPE fields from the legacy ``rope_scaling`` (+ top-level ``rope_theta``) or the newer ``rope_parameters``.

    Same precedence and defaults as transformers: ``rope_scaling`` wins when both are set, a ``rope_theta``
    inside the dict wins over the top-level one, a missing ``factor`` is max_position_embeddings /
    original_max_position_embeddings, a missing ``mscale`` means the plain 0.1 ln(s) + 1 cos/sin factor.
    """
    scaling = d.get("rope_scaling")
    params = d.get("rope_parameters")
    for name, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"config.json {name} must be an object or null, got {value!r}")
    source = scaling or params or {}
    rope_type = _rope_type(source)
    if rope_type not in (None, "default", "yarn"):
        name = "rope_scaling" if scaling else "rope_parameters"
        raise ValueError(f"config.json {name} type {rope_type!r} is not supported (default or yarn)")
    theta = source.get("rope_theta", d.get("rope_theta"))
    if theta is None and params:
        theta = params.get("rope_theta")
    out: dict[str, Any] = {"rope_theta": float(theta) if theta is not None else 10000.0}
    if rope_type != "yarn":
        return {**out, "rope_scaling_type": None, "rope_factor": 1.0}
    # YaRN options transformers honours that DeepSeek's recipe never sets: refuse rather than load other frequencies
    if source.get("truncate", True) is not True:
        raise ValueError(f"config.json yarn truncate={source['truncate']!r} is not supported (DeepSeek's YaRN "
                         "truncates the correction range: true)")
    if source.get("attention_factor") is not None:
        raise ValueError(f"config.json yarn attention_factor={source['attention_factor']!r} is not supported (the "
                         "attention scale comes from mscale and mscale_all_dim)")
    try:
        # as transformers: the yarn block's own value, else the top-level one (nanoseek's to_hf writes it there)
        orig = (source.get("original_max_position_embeddings") or d.get("original_max_position_embeddings")
                or d.get("max_position_embeddings"))
        factor = source.get("factor")
        if factor is None:
            factor = d["max_position_embeddings"] / orig
        return {
            **out,
            "rope_scaling_type": "yarn",
            "rope_factor": float(factor),
            "original_max_position_embeddings": int(orig),
            "beta_fast": float(source.get("beta_fast") or 32),
            "beta_slow": float(source.get("beta_slow") or 1),
            # 0 stands for "absent": m(s, mscale) / m(s, mscale_all_dim) needs both (SPEC §2, transformers' yarn)
            "mscale": float(source.get("mscale") or 0.0),
            "mscale_all_dim": float(source.get("mscale_all_dim") or 0.0),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.json yarn rope parameters {source!r} are incomplete or malformed: {e!r}") from None


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": {},
    "deepseek-r1": {},
    "deepseek-v2": dict(
        vocab_size=102400, hidden_size=5120, num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=2,
        num_experts_per_tok=6, n_group=8, topk_group=3, scoring_func="softmax", topk_method="group_limited_greedy",
        norm_topk_prob=False, routed_scaling_factor=16.0, rope_factor=40.0, original_max_position_embeddings=4096,
        mscale=0.707, mscale_all_dim=0.707, max_position_embeddings=163840, num_nextn_predict_layers=0,
        bos_token_id=100000, eos_token_id=100001, model_type="deepseek_v2"),
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, n_group=1, topk_group=1, scoring_func="softmax", topk_method="greedy",
        norm_topk_prob=False, routed_scaling_factor=1.0, rope_factor=40.0, original_max_position_embeddings=4096,
        mscale=0.707, mscale_all_dim=0.707, max_position_embeddings=163840, num_nextn_predict_layers=0,
        bos_token_id=100000, eos_token_id=100001, model_type="deepseek_v2"),
    # Tiny: unit and parity tests (dims multiples of 16 so torch._grouped_mm's 16-byte stride rule holds).
    "tiny": dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, rope_factor=4.0, original_max_position_embeddings=128,
        max_position_embeddings=512, num_nextn_predict_layers=1, initializer_range=0.02),
    # CPU demo: trains in minutes on 2 cores.
    "demo": dict(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        intermediate_size=768, moe_intermediate_size=128, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, rope_scaling_type=None, rope_factor=1.0,
        original_max_position_embeddings=512, max_position_embeddings=2048, num_nextn_predict_layers=1,
        initializer_range=0.02),
    # Benchmarks: the small MoE of the training issue (64 fine-grained experts, top-6, 8 groups limit 4).
    "bench": dict(
        vocab_size=8192, hidden_size=512, num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=16,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        intermediate_size=1536, moe_intermediate_size=256, n_routed_experts=64, n_shared_experts=1,
        num_experts_per_tok=6, n_group=8, topk_group=4, rope_scaling_type=None, rope_factor=1.0,
        original_max_position_embeddings=4096, max_position_embeddings=4096, num_nextn_predict_layers=1,
        initializer_range=0.02),
}
