"""Context extension with YaRN in stages: DeepSeek-V3's recipe (SPEC §2; V3 report §4.3) scaled to a run.

    nanoseek extend RUN_DIR --out OUT [--stages 4,16] [--steps N] [--factor S] [--passkey-fraction F]

DeepSeek-V3 was pre-trained at 4K tokens, then trained 1000 steps at 32K and 1000 steps at 128K. Both stages
use one YaRN configuration (scale s = 40, original length 4096, beta_fast 32, beta_slow 1, mscale =
mscale_all_dim = 1), the learning rate 7.3e-6 (the final pre-training rate) and batches of 1920 and 480
sequences: 63M tokens per step, as in pre-training (15360 x 4K = 1920 x 32K = 480 x 128K).
For a nanoseek run trained at length L, stage k trains at stages[k] x L, as a new run initialised from the
previous stage's weights (stage 1: the run's), in ``OUT/stage-k``, a Hugging Face checkpoint whose config.json
carries the ``rope_scaling`` block transformers reads:

- YaRN: factor s = final length / original length (``--factor`` to override; V3 chose 40 for a 32x longer
  target), original length L (or the run's own, if it is already YaRN-scaled), beta_fast 32, beta_slow 1,
  mscale = mscale_all_dim = 1; the same in every stage, so that stage 2 continues from the frequencies stage 1
  trained with. max_position_embeddings becomes s x original (V3: 40 x 4096 = 163840), as transformers expects.
- Batch: the base run's tokens per step, as sequences of the new length (micro-batches of at most the base's
  micro-batch tokens).
- Schedule: constant learning rate = the base schedule's final value (V3: 7.3e-6), after a short warmup
  (5% of the steps: unlike V3's continuing optimizer, a new run's AdamW moments start at zero, so its first
  updates are full-size sign steps); the MTP weight lambda and the bias speed gamma keep their final values
  too (V3: 0.1 and 0).
- Steps: 1000 per stage (V3), at most the base run's own steps, unless ``--steps``.
- Data: the base run's training documents (a deterministic sample of about CORPUS_MULTIPLE x the tokens the
  stage trains on) plus passkey examples (``--passkey-fraction`` of the sequences, default 0.1), each exactly
  one window of the stage's length, so the model gets a little retrieval signal at the new length. The base
  run's validation documents stay the validation set. Both go into one JSONL file under the token cache whose
  lines are laid out so that nanoseek's hash split (data.load_corpus) reproduces exactly these two sets and the
  passkey examples come first in the training stream, window-aligned; this is checked after tokenization.

Running ``nanoseek extend`` again continues an interrupted extension (a finished stage is kept, an unfinished
one resumed, and the stages after it start again from its new weights). ``nanoseek eval-long OUT`` evaluates the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..atomic import atomic_open, atomic_write_json, atomic_write_text
from ..config import ModelConfig, read_json_object
from ..passkey import TRAIN_DEPTHS, PasskeyMaker
from . import checkpoint as ckpt_io
from .config import MAX_SEQ_LEN, TrainConfig

V3_STEPS_PER_STAGE = 1000
CORPUS_MULTIPLE = 4  # a stage's corpus holds about this many times the tokens it trains on
WARMUP_FRACTION = 0.05
CORPUS_FORMAT = 1  # bump when the stage corpus layout changes


@dataclass
class Stage:
    index: int  # 1-based
    seq_len: int
    run_dir: Path
    config: TrainConfig  # data is filled in when the stage's corpus is written


# ---------------------------------------------------------------------------------------------- the plan
def yarn_overrides(original: int, factor: float, max_position_embeddings: int) -> dict[str, Any]:
    """The ModelConfig fields of V3's YaRN setting (SPEC §1-§2) for a given scale and original length."""
    return {"rope_scaling_type": "yarn", "rope_factor": float(factor), "original_max_position_embeddings": original,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "max_position_embeddings": max_position_embeddings}


def stage_batch(base: TrainConfig, seq_len: int) -> tuple[int, int]:
    """(batch_size, grad_accum) that keep the base's tokens per step at ``seq_len`` (V3: 15360 x 4K = 1920 x
    32K = 480 x 128K), with micro-batches no larger (in tokens) than the base's."""
    sequences = max(1, round(base.tokens_per_step / seq_len))
    micro = max(1, min(sequences, base.batch_size * base.seq_len // seq_len))
    while sequences % micro:
        micro -= 1
    return micro, sequences // micro


def plan_stages(base: TrainConfig, base_model: ModelConfig, out: Path, base_dir: Path, multiples: list[int], *,
                steps: int | None = None, factor: float | None = None, lr: float | None = None,
                warmup_steps: int | None = None, time_budget: float | None = None) -> list[Stage]:
    """The TrainConfig of every stage (without its corpus), from the base run's settings and model.

    ``multiples``: each stage's length as a multiple of the base run's length L = ``base.seq_len``, increasing.
    Raises ValueError (one line) for lengths that do not grow or a factor below the final length's.
    """
    from .optim import bias_gamma, learning_rate, mtp_lambda

    L = base.seq_len
    if not multiples:
        raise ValueError("--stages: give at least one stage, e.g. --stages 4,16")
    lengths, previous = [], L
    for m in multiples:
        if isinstance(m, bool) or not isinstance(m, int) or m * L <= previous:
            raise ValueError(f"--stages: each stage must be longer than the one before: {m} x {L} = "
                             f"{m * L if isinstance(m, int) else m} is not above {previous}")
        if m * L > MAX_SEQ_LEN:
            raise ValueError(f"--stages: {m} x {L} = {m * L} tokens is longer than the {MAX_SEQ_LEN} a training "
                             "window may hold")
        lengths.append(m * L)
        previous = m * L
    original = base_model.original_max_position_embeddings if base_model.yarn else L
    needed = max(lengths[-1] / original, base_model.rope_factor if base_model.yarn else 1.0)  # never shrink s
    s = float(factor) if factor is not None else needed
    if not math.isfinite(s):
        raise ValueError(f"--factor must be a finite number, got {s:g}")
    if not s >= needed:
        raise ValueError(f"--factor {s:g} is below {needed:g} (the final length {lengths[-1]} / the original "
                         f"length {original}, or the run's own YaRN factor)")
    max_pos = math.ceil(s * original)  # transformers reads factor as max_position_embeddings / original (V3: 40 x 4096)
    rope = yarn_overrides(original, s, max_pos)
    last = base.steps - 1  # the base schedule's final values (V3: lr 7.3e-6, lambda 0.1, gamma 0)
    final_lr = learning_rate(last, base) if lr is None else lr
    lam, gamma = mtp_lambda(last, base), bias_gamma(last, base)
    n = min(V3_STEPS_PER_STAGE, base.steps) if steps is None else steps
    warm = round(WARMUP_FRACTION * n) if warmup_steps is None else warmup_steps
    stages, init = [], base_dir
    for k, T in enumerate(lengths, start=1):
        batch, accum = stage_batch(base, T)
        run_dir = out / f"stage-{k}"
        cfg = base.replace(
            init_from=str(Path(init).resolve()), model_overrides={**base.model_overrides, **rope},
            seq_len=T, batch_size=batch, grad_accum=accum, steps=n,
            batch_warmup_start=None, batch_warmup_tokens=None,  # V3 extends with the full batch from the start
            lr=final_lr, warmup_steps=warm, decay_start=1.0, decay_end=1.0, min_lr_ratio=1.0,
            final_start=None, final_lr_ratio=None,
            mtp_lambda=lam, mtp_lambda_later=lam, mtp_lambda_switch=1.0,
            bias_gamma=gamma, bias_gamma_later=gamma, bias_gamma_switch=1.0,
            eval_every=min(base.eval_every, max(1, n // 4)), save_every=min(base.save_every, max(1, n // 4)),
            time_budget=time_budget, fit_steps_to_budget=time_budget is not None, seed=base.seed + k)
        cfg.validate()
        stages.append(Stage(k, T, run_dir, cfg))
        init = run_dir
    return stages


# ---------------------------------------------------------------------------------------------- the corpus
def write_split_jsonl(path: Path, train_texts: Iterable[str], val_texts: list[str], val_fraction: float) -> None:
    """Write a JSONL corpus that nanoseek's split puts back exactly as given: ``train_texts`` in this order in
    the training split, ``val_texts`` in validation.

    data.load_corpus holds a JSONL line out when the hash of its id "<file name>:<line number>" is below
    val_fraction; so each line number takes the next document of the split its hash assigns, or stays blank
    (blank lines are skipped but numbered) once that split's documents are used up.
    """
    from .data import _unit_hash

    train_iter = iter(train_texts)
    val_iter = iter(val_texts if val_fraction > 0 else [])
    train_left, val_left = True, bool(val_texts) and val_fraction > 0
    with atomic_open(path, "w", encoding="utf-8") as f:
        line = 0
        while train_left or val_left:
            line += 1
            held_out = _unit_hash(f"{path.name}:{line}") < val_fraction
            text = None
            if held_out and val_left:
                text = next(val_iter, None)
                val_left = text is not None
            elif not held_out and train_left:
                text = next(train_iter, None)
                train_left = text is not None
            f.write((json.dumps({"text": text}) if text is not None else "") + "\n")


def sample_documents(docs: list, max_chars: int | None) -> list:
    """A deterministic sample (by a hash of each id) of at most ``max_chars`` characters, in corpus order."""
    if max_chars is None or sum(len(d.text) for d in docs) <= max_chars:
        return list(docs)
    from .data import _unit_hash

    kept, total = set(), 0
    for d in sorted(docs, key=lambda d: _unit_hash("extend:" + d.id)):
        if total >= max_chars:
            break
        kept.add(d.id)
        total += len(d.text)
    return [d for d in docs if d.id in kept]


def stage_corpus(stage: Stage, base: TrainConfig, base_dir: Path, passkey_fraction: float,
                 log: Callable[[str], None], progress: bool = False) -> tuple[Path, dict[str, Any]]:
    """Write (or reuse) the stage's JSONL corpus: passkey examples first, then base training documents. With
    ``progress``, a bar while the passkey examples are made (each is tokenized to fit; ~0.5 s apiece at 16K-32K)."""
    from tqdm.auto import tqdm

    from .data import cache_dir, load_corpus
    from .tokenizer_train import load_tokenizer

    data_info = json.loads((base_dir / "data.json").read_text()) if (base_dir / "data.json").is_file() else {}
    T, cfg = stage.seq_len, stage.config
    tokens_trained = cfg.steps * cfg.tokens_per_step
    chars_per_token = 4.0
    n_tok = sum((data_info.get("tokens") or {}).values())
    if data_info.get("characters") and n_tok:
        chars_per_token = data_info["characters"] / n_tok
    max_chars = int(CORPUS_MULTIPLE * tokens_trained * chars_per_token)
    key_src = json.dumps([CORPUS_FORMAT, data_info.get("cache"), base.data, base.val_fraction, base.max_corpus_mb,
                          T, tokens_trained, passkey_fraction, cfg.seed], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    root = cache_dir(base.cache_dir) / "extend"
    root.mkdir(parents=True, exist_ok=True)
    path, meta_path = root / f"{key}.jsonl", root / f"{key}.json"
    if path.is_file() and meta_path.is_file():
        return path, json.loads(meta_path.read_text())

    max_base = int(base.max_corpus_mb * 1e6) if base.max_corpus_mb else None
    corpus = load_corpus(base.data, base.text_field, base.val_fraction, max_base, root=base.data_root)
    train_docs = sample_documents(corpus.train, max_chars)
    text_tokens = sum(len(d.text) for d in train_docs) / chars_per_token
    n_passkey = math.ceil(passkey_fraction / (1.0 - passkey_fraction) * text_tokens / T) if passkey_fraction else 0
    tokenizer = load_tokenizer(base_dir / "tokenizer.json")
    rng = random.Random(f"extend:{cfg.seed}:{T}")
    maker = PasskeyMaker(tokenizer) if n_passkey else None  # --passkey-fraction 0: no passkey set-up at all
    passkeys = []
    for _ in tqdm(range(n_passkey), desc=f"stage {stage.index}: passkey examples", unit="example", file=sys.stderr,
                  dynamic_ncols=True, leave=False, disable=not progress or n_passkey < 2):
        depth = rng.choice(TRAIN_DEPTHS)
        ex = maker.make(T, depth, str(rng.randrange(10000, 100000)), phase=rng.randrange(len(maker.words)))
        passkeys.append(ex)
    log(f"stage {stage.index}: corpus of {len(train_docs)} base training documents (~{text_tokens / 1e6:.2f} M "
        f"tokens) + {n_passkey} passkey examples of {T} tokens; {len(corpus.val)} validation documents")
    write_split_jsonl(path, [e.text for e in passkeys] + [d.text for d in train_docs],
                      [d.text for d in corpus.val], base.val_fraction)
    check = sorted({0, 1, n_passkey // 2, n_passkey - 1} & set(range(n_passkey)))  # windows checked after tokenizing
    meta = {"passkey_examples": n_passkey, "passkey_check": check, "passkey_ids": [passkeys[i].ids for i in check],
            "train_documents": len(train_docs), "val_documents": len(corpus.val), "seq_len": T}
    atomic_write_text(meta_path, json.dumps(meta))  # last: the cache entry's completion marker
    return path, meta


def check_alignment(data, meta: dict[str, Any], seq_len: int) -> float:
    """Verify that training window i holds passkey example i (bos + ids + eos) for the recorded examples;
    return the passkey fraction of the stage's training windows."""
    seqs = data.train_sequences(seq_len)
    for i, ids in zip(meta["passkey_check"], meta["passkey_ids"]):
        window = seqs.batch([i])[0, :seq_len].tolist()
        if window != [data.bos_id] + ids + [data.eos_id]:
            raise RuntimeError(f"the stage corpus is not window-aligned (training window {i} is not passkey example "
                               f"{i}): nanoseek's data split or packing changed; update train/extend.py")
    return meta["passkey_examples"] / max(1, len(seqs))


# ---------------------------------------------------------------------------------------------- the recipe
def read_base(run_dir: Path) -> tuple[TrainConfig, ModelConfig, int]:
    """The base run's TrainConfig, ModelConfig and trained steps, with one-line errors."""
    from . import checkpoint as ckpt_io

    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not (run_dir / "train_config.json").is_file():
        raise ValueError(f"{run_dir} is not a nanoseek training run (no train_config.json): extend needs the run's "
                         "data, tokenizer and schedule")
    if (run := ckpt_io.run_of_checkpoint(run_dir)) is not None:
        raise ValueError(f"{run_dir} is a checkpoint of the run {run}, not a run: extend the run ({run}), which "
                         "extends its last checkpoint")
    _, state, saved = ckpt_io.read_checkpoint_config(run_dir)
    cfg = TrainConfig.from_dict(saved)
    return cfg, ModelConfig.from_hf(run_dir), int(state["step"])


def _plan_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings that differ between two plans (extend.json): top-level keys, and for the per-stage
    settings the field (steps, lr, warmup_steps, ...) rather than "stages"."""
    changed = set()
    for k in new:
        if old.get(k) == new[k]:
            continue
        a, b = old.get(k), new[k]
        if k == "stages" and isinstance(a, list) and len(a) == len(b) and all(isinstance(st, dict) for st in a):
            changed.update(f for st_a, st_b in zip(a, b) for f in st_b if f != "dir" and st_a.get(f) != st_b[f])
        else:
            changed.add(k)
    return sorted(changed)


def _stage_done(stage: Stage) -> bool | None:
    """True: finished; False: started (resume it); None: not started."""
    progress = ckpt_io.run_progress(stage.run_dir)
    return None if progress is None else progress[0] >= progress[1]


def extend(run_dir: str | Path, out: str | Path, multiples: list[int] = (4, 16), *, steps: int | None = None,
           factor: float | None = None, lr: float | None = None, warmup_steps: int | None = None,
           passkey_fraction: float = 0.1, time_budget: float | None = None, threads: int | None = None,
           progress: bool = True, report: bool = False, overwrite: bool = False,
           log: Callable[[str], None] | None = None) -> list[Stage]:
    """Extend the context of the run in ``run_dir`` in stages (see the module docstring); return the stages."""
    from .loop import train

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    run_dir, out = Path(run_dir), Path(out)
    if not 0.0 <= passkey_fraction < 1.0:
        raise ValueError(f"--passkey-fraction must be in [0, 1), got {passkey_fraction}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"--steps must be a positive integer, got {steps!r}")
    base, base_model, base_step = read_base(run_dir)
    if base_step < base.steps:
        log(f"note: {run_dir} stopped at step {base_step} of {base.steps}; extending its last checkpoint")
    base = base.replace(steps=max(1, base_step))  # the schedule as it actually ended
    if out.resolve() == run_dir.resolve():
        raise ValueError("--out must differ from the run directory being extended")
    if run_dir.resolve() in out.resolve().parents or out.resolve() in run_dir.resolve().parents:
        raise ValueError(f"--out {out} and the run directory being extended, {run_dir}, must not lie one inside the "
                         "other")  # a stage's --overwrite would set its own base aside; extend.json would be replaced
    plan_file = out / "extend.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not plan_file.is_file():
        raise ValueError(f"--out {out} exists and is not empty (and is not a `nanoseek extend` output)")
    stages = plan_stages(base, base_model, out, run_dir, list(multiples), steps=steps, factor=factor, lr=lr,
                         warmup_steps=warmup_steps, time_budget=time_budget)
    for st in stages:
        st.config = st.config.replace(threads=base.threads if threads is None else threads, progress=progress,
                                      report=report)
        st.config.validate()  # --threads: before anything is written
    rope = stages[0].config.model_overrides
    plan = {"base": str(run_dir.resolve()), "base_length": base.seq_len, "multiples": list(multiples),
            "rope": {k: rope[k] for k in yarn_overrides(0, 1, 0)},
            "passkey_fraction": passkey_fraction,
            "stages": [{"dir": st.run_dir.name, "seq_len": st.seq_len, "batch_size": st.config.batch_size,
                        "grad_accum": st.config.grad_accum, "steps": st.config.steps, "lr": st.config.lr,
                        "warmup_steps": st.config.warmup_steps, "mtp_lambda": st.config.mtp_lambda,
                        "bias_gamma": st.config.bias_gamma_later} for st in stages]}
    out.mkdir(parents=True, exist_ok=True)
    started = any(ckpt_io.current_checkpoint(st.run_dir) is not None for st in stages if st.run_dir.is_dir())
    if plan_file.is_file() and not overwrite and started:  # before any stage's checkpoint, a new plan replaces it
        old = read_json_object(plan_file)
        if old != plan:
            changed = _plan_changes(old, plan)
            raise ValueError(f"{out} holds an extension with other settings ({', '.join(changed)}): pass --overwrite "
                             "to start again, or another --out")
    atomic_write_json(plan_file, plan)
    log(f"extend: {run_dir} (trained at {base.seq_len}) -> " + " -> ".join(str(st.seq_len) for st in stages)
        + f" with YaRN s={rope['rope_factor']:g}, original length {rope['original_max_position_embeddings']}; "
        f"lr {stages[0].config.lr:.3g} constant, {stages[0].config.steps} steps per stage")

    from .data import prepare_data

    short = []  # stages a --time-budget stopped before their last step
    restart = overwrite  # once a stage trains, every later one starts again: it starts from that stage's weights
    for st in stages:
        done = None if restart else _stage_done(st)
        if done:
            log(f"stage {st.index}: {st.run_dir} already finished")
            continue
        corpus, meta = stage_corpus(st, base, run_dir, passkey_fraction, log, progress=st.config.progress)
        st.config = st.config.replace(data=[str(corpus)], text_field="text", max_corpus_mb=None,
                                      tokenizer=str((run_dir / "tokenizer.json").resolve()))
        if meta["passkey_examples"]:
            data = prepare_data(st.config, tokenizer_path=Path(st.config.tokenizer), log=log)
            frac = check_alignment(data, meta, st.seq_len)
            log(f"stage {st.index}: passkey examples are {frac:.1%} of the {st.seq_len}-token training windows")
        cfg = st.config
        if done is False:  # the stage's own steps: those a --time-budget fitted it to, if it did
            from .loop import resume_config

            cfg = resume_config(st.run_dir, {"time_budget": cfg.time_budget,
                                             "fit_steps_to_budget": cfg.fit_steps_to_budget,
                                             "threads": cfg.threads, "progress": cfg.progress})
        log(f"stage {st.index}: {cfg.steps} steps of {cfg.batch_size} x {cfg.grad_accum} x {cfg.seq_len} tokens, "
            f"lr {cfg.lr:.3g}, from {cfg.init_from}")
        result = train(cfg, st.run_dir, resume=done is False, overwrite=done is None, log=log)
        restart = True
        if result.stopped_by == "time_budget":  # before its last step
            short.append(st.index)
            log(f"stage {st.index}: stopped by the time budget at step {result.step}; running the same command "
                "again continues it")
        if report:
            from .report import write_report

            write_report(st.run_dir, sample=True, log=log)
    final = out / "final"
    if final.is_symlink() or final.exists():
        final.unlink()
    final.symlink_to(stages[-1].run_dir.name)
    if short:
        log(f"extend: stage {', '.join(map(str, short))} stopped by the time budget before its last step: the "
            f"{stages[-1].seq_len}-token model is {final} ({stages[-1].run_dir}) as it stands; run the same command "
            "again to finish")
    else:
        log(f"extend: done; the {stages[-1].seq_len}-token model is {final} ({stages[-1].run_dir}); "
            f"evaluate with: nanoseek eval-long {out}")
    return stages


# ---------------------------------------------------------------------------------------------- command line
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extend", help="extend a run's context window with YaRN in stages (DeepSeek-V3's 4K->32K->128K recipe)",
        description="From a run trained at length L, train stage k at stages[k] x L with YaRN (DeepSeek-V3's "
                    "settings), each stage a new run initialised from the previous one's weights.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the trained run to extend")
    p.add_argument("--out", required=True, help="output directory (stage-1, stage-2, ..., final, extend.json)")
    p.add_argument("--stages", default="4,16", help="stage lengths as multiples of L (default 4,16: V3's 8x, 32x "
                                                    "scaled to a short run)")
    p.add_argument("--steps", type=int, help=f"steps per stage (default {V3_STEPS_PER_STAGE}, as V3, at most the "
                                             "base run's)")
    p.add_argument("--factor", type=float, help="YaRN scale s (default final length / L)")
    p.add_argument("--lr", type=float, help="constant learning rate (default: the base schedule's final one)")
    p.add_argument("--warmup-steps", type=int, help="warmup steps per stage (default 5%% of the steps)")
    p.add_argument("--passkey-fraction", type=float, default=0.1,
                   help="fraction of the training sequences that are passkey examples (default 0.1)")
    p.add_argument("--time-budget", type=float, help="minutes per stage: the steps are fitted to it")
    p.add_argument("--threads", type=int, help="torch threads (default: the base run's)")
    p.add_argument("--report", action="store_true", help="write each stage's report.md")
    p.add_argument("--overwrite", action="store_true", help="start every stage again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_extend)


def cmd_extend(args) -> int:
    from .loop import TrainingError

    try:
        multiples = [int(v) for v in args.stages.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--stages takes comma-separated integers (multiples of the run's length), got "
                         f"{args.stages!r}") from None
    try:
        extend(args.run_dir, args.out, multiples, steps=args.steps, factor=args.factor, lr=args.lr,
               warmup_steps=args.warmup_steps, passkey_fraction=args.passkey_fraction, time_budget=args.time_budget,
               threads=args.threads, progress=not args.no_progress, report=args.report, overwrite=args.overwrite)
    except TrainingError as e:
        print(f"nanoseek extend: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = "the same command without --overwrite" if args.overwrite else "the same command"
        print(f"\nnanoseek extend: interrupted; run {again} again to continue", file=sys.stderr)
        return 130
    print(Path(args.out) / "final")
    return 0
