"""Long-context extension with YaRN at small scale: DeepSeek-V3's two-stage recipe (4K -> 32K -> 128K) on the
`demo` preset, L = 128 -> 512 -> 2048, and the evaluation of issue 6.

    python experiments/long-context/run.py [--base-steps 300] [--stage-steps 150] [--windows 24]
                                            [--passkey-samples 10] [--scratch DIR] [--force]

1. Base corpus: the Python standard library (the default corpus, its usual train / validation split and the
   demo's cached tokenizer) plus passkey examples of exactly L = 128 tokens, 10% of the training windows, so
   that the base model can do the task within its own window (as the YaRN paper's base models can), and the
   evaluation can ask whether it carries the skill to longer inputs.
2. Base run: `nanoseek train --preset demo --seq-len 128 --batch-size 32` (4,096 tokens per step, the demo's),
   no RoPE scaling.
3. `nanoseek extend BASE --stages 4,16`: stage 1 at 512 (8 x 512 per step), stage 2 at 2048 (2 x 2048), YaRN s =
   16, original length 128, lr = the base's final 3e-4, constant; 10% passkey windows at each stage's length.
4. `nanoseek eval-long EXT`: loss by position on 24 validation windows of 2048 tokens, passkey accuracy on
   8 lengths x 6 held-out depths x 10 examples, for (a) base, (b) base + YaRN untrained, (c1) stage 1,
   (c2) stage 2.

Everything runs with one torch thread (`--threads 1`, OMP_WAIT_POLICY=PASSIVE): the machine is shared. Runs go
under the scratch directory (default /tmp/nanoseek-exp/long-context); a finished step is reused (same
command), so the script can be re-run. results.json, tables.md and the PNGs are written here; results.md
(the interpretation) is written by hand from them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from nanoseek.atomic import atomic_write_json, atomic_write_text

HERE = Path(__file__).resolve().parent
SCRATCH = Path("/tmp/nanoseek-exp/long-context")
L = 128
PASSKEY_FRACTION = 0.1
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def base_corpus(scratch: Path) -> tuple[Path, Path]:
    """The stdlib split as nanoseek makes it, plus passkey examples of L tokens at the front of the training
    stream (one per window), as one JSONL; and the demo's tokenizer (trained on the stdlib training split)."""
    from nanoseek.passkey import TRAIN_DEPTHS, PasskeyMaker
    from nanoseek.train.data import cache_dir, load_corpus
    from nanoseek.train.extend import write_split_jsonl
    from nanoseek.train.tokenizer_train import save_tokenizer, special_ids, trained_tokenizer
    import random

    corpus_path, tok_dir = scratch / "base-corpus.jsonl", scratch / "tokenizer"
    if corpus_path.is_file() and (tok_dir / "tokenizer.json").is_file():
        return corpus_path, tok_dir
    corpus = load_corpus([], val_fraction=0.05)
    tok, _ = trained_tokenizer(corpus.train, 8192, cache_dir(None), log=log)  # the demo's (cached)
    save_tokenizer(tok, tok_dir, special_ids(tok))
    n_train = sum(len(e.ids) + 2 for e in tok.encode_batch([d.text for d in corpus.train], add_special_tokens=False))
    n_passkey = math.ceil(PASSKEY_FRACTION / (1 - PASSKEY_FRACTION) * n_train / L)
    maker, rng = PasskeyMaker(tok), random.Random("base-passkeys")
    passkeys = [maker.make(L, rng.choice(TRAIN_DEPTHS), str(rng.randrange(10000, 100000)),
                           phase=rng.randrange(len(maker.words))).text for _ in range(n_passkey)]
    log(f"base corpus: {len(corpus.train)} train documents ({n_train:,} tokens) + {n_passkey} passkey examples of "
        f"{L} tokens; {len(corpus.val)} validation documents")
    write_split_jsonl(corpus_path, passkeys + [d.text for d in corpus.train], [d.text for d in corpus.val], 0.05)
    return corpus_path, tok_dir


def run(cmd: list[str], log_file: Path) -> float:
    log(shlex.join(cmd))
    t0 = time.time()
    with open(log_file, "w") as f:
        # `nanoseek ...` run as `python -m nanoseek ...` with this interpreter (no `nanoseek` on PATH needed)
        subprocess.run([sys.executable, "-m", *cmd], env=ENV, stdout=f, stderr=subprocess.STDOUT, check=True)
    dt = time.time() - t0
    log(f"done in {dt / 60:.1f} min (log: {log_file})")
    return dt


def finished(stamp: Path, cmd: list[str]) -> bool:
    return stamp.is_file() and json.loads(stamp.read_text()) == cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-steps", type=int, default=300, metavar="N",
                   help=f"optimizer steps of the base run at L = {L} tokens (default %(default)s)")
    p.add_argument("--stage-steps", type=int, default=150, metavar="N",
                   help=f"optimizer steps of each YaRN stage, at {4 * L} and {16 * L} tokens (default %(default)s)")
    p.add_argument("--windows", type=int, default=24, metavar="N",
                   help=f"validation windows of {16 * L} tokens for the loss by position (default %(default)s)")
    p.add_argument("--passkey-samples", type=int, default=10, metavar="N",
                   help="passkey examples per length and depth in the evaluation (default %(default)s)")
    p.add_argument("--scratch", type=Path, default=SCRATCH, metavar="DIR",
                   help="directory of the base corpus, the runs, their logs and the finished-step stamps "
                        "(default %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="redo every step (base run, extension, evaluation), even one finished with the same "
                        "command; the base corpus and tokenizer are reused")
    args = p.parse_args(argv)
    scratch = args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    commands: list[str] = []

    corpus, tok_dir = base_corpus(scratch)
    base, ext = scratch / "base", scratch / "ext"
    steps = [
        ("base", ["nanoseek", "train", "--preset", "demo", "--data", str(corpus), "--tokenizer", str(tok_dir),
                  "--seq-len", str(L), "--batch-size", "32", "--steps", str(args.base_steps), "--bias-gamma", "0.01",
                  "--eval-every", "50", "--save-every", "100", "--seed", "0", "--threads", "1", "--no-report",
                  "--no-progress", "--out", str(base), "--overwrite"]),
        ("extend", ["nanoseek", "extend", str(base), "--out", str(ext), "--stages", "4,16", "--steps",
                    str(args.stage_steps), "--passkey-fraction", str(PASSKEY_FRACTION), "--threads", "1",
                    "--no-progress"] + (["--overwrite"] if args.force else [])),
        ("eval", ["nanoseek", "eval-long", str(ext), "--windows", str(args.windows), "--passkey-samples",
                  str(args.passkey_samples), "--threads", "1", "--no-progress", "--out", str(scratch / "eval")]),
    ]
    for name, cmd in steps:
        commands.append(shlex.join(cmd))
        stamp = scratch / f"{name}.done.json"
        if not args.force and finished(stamp, cmd):
            log(f"{name}: reusing the finished step")
            timings[name] = json.loads((scratch / f"{name}.time.json").read_text())
            continue
        stamp.unlink(missing_ok=True)
        timings[name] = run(cmd, scratch / f"{name}.log")
        atomic_write_text(scratch / f"{name}.time.json", json.dumps(timings[name]))
        atomic_write_text(stamp, json.dumps(cmd))  # last: the step's completion stamp

    results = json.loads((scratch / "eval" / "results.json").read_text())
    results["timings_s"] = timings
    results["commands"] = commands
    results["extend_plan"] = json.loads((ext / "extend.json").read_text())
    from nanoseek.eval_long import format_cache_report, markdown_tables, plot

    plot(results, HERE)  # loss_by_position.png, passkey.png
    atomic_write_json(HERE / "results.json", results, indent=1)
    tables = markdown_tables(results) + "\n" + format_cache_report("deepseek-v3", results["cache_deepseek_v3_128k"])
    atomic_write_text(HERE / "tables.md", f"<!-- written by {Path(__file__).name} from results.json -->\n\n{tables}\n")
    log(f"wrote {HERE / 'results.json'}, tables.md and the plots; total {sum(timings.values()) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
