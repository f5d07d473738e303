"""TrainConfig: everything a training run needs besides the model architecture's preset, as one dataclass
that the CLI fills, the run directory stores (``train_config.json``) and ``--resume`` reads back.

The defaults follow DeepSeek-V3's recipe (SPEC §4-§6) scaled to a short run: AdamW (0.9, 0.95), weight
decay 0.1, clip 1.0, warmup -> constant -> cosine to lr/10, MTP lambda 0.3 then 0.1, bias speed gamma
0.001 then 0, sequence-wise balance alpha 1e-4. Sizes default to the CPU demo's (the ``demo`` model on the
standard library); ``TrainConfig.demo()`` is the demo itself: up to 760 steps fitted to an 8.5-minute budget,
and bias speed 0.01 (see DEMO below).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json

BALANCE_MODES = ("bias", "aux", "none")
DTYPES = ("bf16", "bf16-weights", "fp32", "fp8")
OPTIMIZER_STATES = ("fp32", "bf16")
MIN_VOCAB = 258  # 256 byte tokens + bos + eos
MAX_VOCAB = 1 << 20
MIN_SEQ_LEN = 8
MAX_SEQ_LEN = 1 << 20

# Fields that may differ when a run is resumed (they change neither the model, the data stream nor the
# optimization up to the checkpoint). Everything else must match the checkpoint's train_config.json.
RESUMABLE_CHANGES = {
    "steps", "time_budget", "eval_every", "eval_batches", "save_every", "log_every", "keep_checkpoints",
    "sample_prompt", "sample_tokens", "compile", "activation_checkpointing", "threads", "max_bad_steps",
    "cache_dir", "report", "progress", "fit_steps_to_budget",
}


@dataclass
class TrainConfig:
    # ---- model
    preset: str = "demo"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, e.g. hidden_size
    # a run directory or Hugging Face checkpoint whose weights start this run (a new run: fresh optimizer and
    # schedule); the architecture must match, only RoPE scaling and max_position_embeddings may differ
    init_from: str | None = None
    mtp_depth: int | None = None  # num_nextn_predict_layers; None: the preset's
    # ---- data
    data: list[str] = field(default_factory=list)  # files, dirs, globs, *.jsonl, hf:NAME[:CONFIG][:SPLIT]; []: stdlib
    text_field: str = "text"  # JSONL / datasets column
    data_root: str | None = None  # relative `data` globs and paths are read from here (the CLI: the start's cwd)
    val_fraction: float = 0.05  # fraction of documents (by file) held out
    max_corpus_mb: float | None = None  # cap on the characters read (a deterministic subset of the documents)
    tokenizer: str | None = None  # a tokenizer.json (file or directory); None: train byte-level BPE
    vocab_size: int = 8192  # of the trained tokenizer
    cache_dir: str | None = None  # tokenizer/token cache; None: $NANOSEEK_CACHE or ~/.cache/nanoseek
    # ---- batch and length
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    # batch-size warmup (SPEC §6; V3: 3072 -> 15360 sequences over the first 469B tokens): a step starts with
    # batch_warmup_start sequences (a multiple of batch_size) and grows linearly in tokens to batch_size x
    # grad_accum at batch_warmup_tokens; None: every step has the full batch
    batch_warmup_start: int | None = None
    batch_warmup_tokens: int | None = None
    steps: int = 360
    # ---- optimizer and schedule (SPEC §6)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (V3: 2.2e-4 -> 2.2e-5)
    warmup_steps: int = 30
    decay_start: float = 0.5  # fraction of the steps after which the cosine decay starts (V3: 10T of 14.8T, 0.68)
    decay_end: float = 1.0  # fraction of the steps where it reaches lr * min_lr_ratio, held after (V3: 14.3T)
    final_start: float | None = None  # a last constant tail from this fraction of the steps (V3: 14.633T of 14.8T)
    final_lr_ratio: float | None = None  # at lr * final_lr_ratio (V3: 7.3e-6 / 2.2e-4)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    decay_embeddings: bool = False
    decay_norms_and_biases: bool = False
    # ---- objectives (SPEC §4-§5)
    mtp_lambda: float = 0.3
    mtp_lambda_later: float = 0.1
    mtp_lambda_switch: float = 0.68  # fraction of the steps (V3: 10T of 14.8T tokens)
    balance: str = "bias"  # bias: loss-free bias + sequence-wise loss; aux: loss only; none
    balance_alpha: float | None = None  # None: 1e-4 with bias (V3), 0.01 with aux, 0 with none
    bias_gamma: float = 0.001
    bias_gamma_later: float = 0.0
    bias_gamma_switch: float = 0.97  # fraction of the steps (V3: 14.3T of 14.8T tokens)
    # ---- runtime
    # bf16: autocast of the matrix products, fp32 weights and optimizer; bf16-weights: bf16 weights, fp32 master
    # weights and optimizer (train/precision.py); fp32: fp32 throughout; fp8: V3's FP8 products of the linear
    # layers emulated, fp32 elsewhere (train/fp8_mixed.py)
    dtype: str = "bf16"
    # AdamW's moments with --dtype bf16-weights: fp32, or bf16 as DeepSeek-V3 keeps them (V3 report §3.3.3)
    optimizer_states: str = "fp32"
    device: str | None = None  # None: cuda if available, else cpu
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 0
    threads: int | None = None
    eval_every: int = 60
    eval_batches: int = 8
    save_every: int = 60
    keep_checkpoints: int = 1
    log_every: int = 1
    time_budget: float | None = None  # minutes of training in this process; stops gracefully
    fit_steps_to_budget: bool = False  # measure the first steps, then lower `steps` to fit the time budget
    max_bad_steps: int = 3  # consecutive NaN/inf steps before stopping
    sample_prompt: str = "def"  # no trailing space: BPE words carry their leading space
    sample_tokens: int = 64
    report: bool = True
    progress: bool = True

    # ------------------------------------------------------------------ derived
    @property
    def effective_balance_alpha(self) -> float:
        if self.balance_alpha is not None:
            return self.balance_alpha
        return {"bias": 1e-4, "aux": 0.01, "none": 0.0}[self.balance]

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError with a one-line message for the first out-of-range field."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{flag_name(f.name)} must be a finite number, got {v}")

        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{flag_name(name)} must be a positive integer, got {v!r}")

        for name in ("batch_size", "grad_accum", "steps", "eval_every", "eval_batches", "save_every",
                     "keep_checkpoints", "log_every", "max_bad_steps"):
            positive_int(name)
        self._validate_batch_warmup()
        if not isinstance(self.seq_len, int) or not MIN_SEQ_LEN <= self.seq_len <= MAX_SEQ_LEN:
            raise ValueError(f"--seq-len must be an integer in [{MIN_SEQ_LEN}, {MAX_SEQ_LEN}], got {self.seq_len!r}")
        if self.tokenizer is None and (not isinstance(self.vocab_size, int)
                                       or not MIN_VOCAB <= self.vocab_size <= MAX_VOCAB):
            raise ValueError(f"--vocab-size must be an integer in [{MIN_VOCAB}, {MAX_VOCAB}] (256 bytes + bos + eos "
                             f"at least), got {self.vocab_size!r}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"--balance must be one of {', '.join(BALANCE_MODES)}, got {self.balance!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer_states not in OPTIMIZER_STATES:
            raise ValueError(f"--optimizer-states must be one of {', '.join(OPTIMIZER_STATES)}, got "
                             f"{self.optimizer_states!r}")
        if self.optimizer_states == "bf16" and self.dtype != "bf16-weights":
            raise ValueError("--optimizer-states bf16 keeps the moments of the fp32 master weights' AdamW in bf16: it "
                             f"needs --dtype bf16-weights, not --dtype {self.dtype}")
        if self.dtype == "fp8" and (self.compile or self.activation_checkpointing):
            raise ValueError("--dtype fp8 emulates FP8 products in eager mode, without recomputation: leave out "
                             + ("--compile" if self.compile else "--activation-checkpointing"))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        for name in ("decay_start", "decay_end", "mtp_lambda_switch", "bias_gamma_switch", "min_lr_ratio",
                     "final_start", "final_lr_ratio"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{flag_name(name)} must be in [0, 1], got {v}")
        if self.decay_end < self.decay_start:
            raise ValueError(f"--decay-end ({self.decay_end}) must not be before --decay-start ({self.decay_start})")
        if (self.final_start is None) != (self.final_lr_ratio is None):
            raise ValueError("--final-start and --final-lr-ratio go together: give both or neither")
        if self.final_start is not None and self.final_start < self.decay_end:
            raise ValueError(f"--final-start ({self.final_start}) must not be before --decay-end ({self.decay_end})")
        for name in ("weight_decay", "mtp_lambda", "mtp_lambda_later", "bias_gamma", "bias_gamma_later", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag_name(name)} must be >= 0, got {getattr(self, name)}")
        if self.balance_alpha is not None and self.balance_alpha < 0:
            raise ValueError(f"--balance-alpha must be >= 0, got {self.balance_alpha}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"AdamW betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if self.mtp_depth is not None and (not isinstance(self.mtp_depth, int) or not 0 <= self.mtp_depth < self.seq_len):
            raise ValueError(f"--mtp-depth must be an integer in [0, seq_len), got {self.mtp_depth!r}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"--time-budget must be positive (minutes), got {self.time_budget}")
        if self.max_corpus_mb is not None and self.max_corpus_mb <= 0:
            raise ValueError(f"--max-corpus-mb must be positive, got {self.max_corpus_mb}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"--threads must be positive, got {self.threads}")
        if self.sample_tokens < 0:
            raise ValueError(f"--sample-tokens must be >= 0, got {self.sample_tokens}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"--seed must be an integer in [0, 2^63), got {self.seed!r}")
        if not isinstance(self.data, (list, tuple)):  # a str would be read as one spec per character
            raise ValueError(f"data must be a list of files, directories, globs or hf: datasets, got "
                             f"{type(self.data).__name__} {self.data!r}")
        for spec in self.data:
            if not isinstance(spec, str) or not spec.strip():
                raise ValueError(f"--data names a file, directory, glob or hf: dataset, got {spec!r}")

    def _validate_batch_warmup(self) -> None:
        start, tokens, full = self.batch_warmup_start, self.batch_warmup_tokens, self.batch_size * self.grad_accum
        if (start is None) != (tokens is None):
            raise ValueError("--batch-warmup-start and --batch-warmup-tokens go together: give both or neither")
        if start is None:
            return
        if not isinstance(start, int) or isinstance(start, bool) or start <= 0 or start % self.batch_size:
            raise ValueError(f"--batch-warmup-start must be a positive multiple of --batch-size {self.batch_size} "
                             f"(whole micro-batches), got {start!r}")
        if start >= full:
            raise ValueError(f"--batch-warmup-start {start} must be below the full batch of --batch-size x "
                             f"--grad-accum = {full} sequences (raise --grad-accum to warm up to it)")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
            raise ValueError(f"--batch-warmup-tokens must be a positive integer, got {tokens!r}")

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise FileNotFoundError(f"no training configuration at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a valid training configuration: {e}") from None

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def demo(cls, **changes: Any) -> "TrainConfig":
        """The CPU demo: the `demo` model on the standard library, about 10 minutes on 2 cores."""
        return cls(**{**DEMO, **changes})


def flag_name(name: str) -> str:
    """A TrainConfig field's command-line flag: balance_alpha -> --balance-alpha."""
    return "--" + name.replace("_", "-")


# The defaults above are tuned for the demo model on 2 CPU cores (see README "Training"): ~7.3k tokens/s in
# bf16. The demo trains up to 760 steps (~7.1 minutes measured) within a time budget, and fits
# the number of steps (hence the whole learning-rate schedule) to it after timing the first steps, so a slower
# machine still finishes in time.
# Its bias speed is 10x V3's 0.001: over a few hundred steps, 0.001 moves a bias by at most ~0.3 and the
# expert load stays visibly unbalanced (MaxVio_global ~1.8 after 225 steps, 0.4 with 0.01 after 120).
DEMO: dict[str, Any] = dict(steps=760, time_budget=8.5, fit_steps_to_budget=True, bias_gamma=0.01)
