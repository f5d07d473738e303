"""Run directories: a loadable Hugging Face checkpoint plus the training state, saved atomically.

Layout of a run directory::

    runs/demo/
      config.json        -> checkpoint/config.json          (symlinks: the directory loads with
      model.safetensors  -> checkpoint/model.safetensors     load_pretrained / transformers as it is)
      tokenizer.json, tokenizer_config.json                 (written once, before the first checkpoint)
      checkpoint         -> checkpoints/step-00000360       (the one pointer that says which checkpoint is current)
      checkpoints/step-00000360/
        config.json, model.safetensors                      (nanoseek.hf.save_pretrained, fp32, MTP included)
        tokenizer.json, tokenizer_config.json
        training_state.safetensors                          (AdamW moments and steps by parameter name, RNG states)
        trainer_state.json                                  (step, tokens, data position, schedule values, ...)
        train_config.json                                   (the TrainConfig of the run)
      train_config.json, data.json, metrics.jsonl, report.md, plots/, sample.txt

Atomicity: a checkpoint is written completely into a fresh hidden directory under ``checkpoints/``, every file
fsynced, then renamed to ``step-N``; only then is the ``checkpoint`` symlink replaced by a new one in a single
``rename(2)``. A kill at any moment leaves ``checkpoint`` pointing at a complete checkpoint: the previous one
until the rename, the new one after it. Model weights and training state live in the same directory, so they
always belong together. Older checkpoints and leftovers of interrupted saves are deleted after the switch.

Nothing here unpickles: tensors are read with safetensors, everything else is JSON that is type-checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ..atomic import fsync_dir, fsync_tree
from ..hf import CheckpointError, load_pretrained, save_pretrained

POINTER = "checkpoint"
# A copy that followed the symlinks (cp -rL, scp -r) has a real directory as ``checkpoint``: the next save moves
# it here, then links ``checkpoint`` anew; in between, this is the current checkpoint.
COPIED_POINTER = ".checkpoint.copied"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "training_state.safetensors"
CONFIG_FILE = "train_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HF_LINKS = ("config.json", "model.safetensors")
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")

# A hook the tests use to simulate a kill at a chosen point of a save: called with a stage name.
_save_hook: Callable[[str], None] | None = None


def _stage(name: str) -> None:
    if _save_hook is not None:
        _save_hook(name)


# ---------------------------------------------------------------------------------------------- symlinks
def _replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (relative) in one rename: readers see the old or the new target."""
    tmp = link.parent / f".{link.name}.{uuid.uuid4().hex[:8]}.lnk"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


# ---------------------------------------------------------------------------------------------- lock
@contextmanager
def run_lock(run_dir: Path):
    """An exclusive lock on the run directory: two trainers never write the same run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fh = open(run_dir / ".lock", "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"{run_dir} is in use by another training process") from None
        yield
    finally:
        fh.close()


# ---------------------------------------------------------------------------------------------- optimizer state
def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state keyed by parameter name: ``optim.{name}.{exp_avg|exp_avg_sq|step}``."""
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"optim.{name}.{key}"] = value.detach().to("cpu").contiguous()
                else:
                    out[f"optim.{name}.{key}"] = torch.tensor(float(value), dtype=torch.float64)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Put saved moments back, checking that every parameter's state is there and has its shape."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    index = 0
    problems: list[str] = []
    expected = set()
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            entry = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                tkey = f"optim.{name}.{key}"
                expected.add(tkey)
                t = tensors.get(tkey)
                if t is None:
                    problems.append(f"missing {tkey}")
                    continue
                if key != "step" and tuple(t.shape) != tuple(p.shape):
                    problems.append(f"{tkey} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
                    continue
                if not t.is_floating_point():
                    problems.append(f"{tkey} is not a float tensor")
                    continue
                entry[key] = t.to(torch.float32) if key == "step" else t.to(p.device, p.dtype)
            state[index] = entry
            index += 1
    extra = sorted(k for k in tensors if k.startswith("optim.") and k not in expected)
    if extra:
        problems.append(f"{len(extra)} unexpected entries (e.g. {extra[0]})")
    if problems:
        raise CheckpointError(f"{where}: optimizer state does not match the model: " + "; ".join(problems[:5]))
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------- RNG
def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor], where: Path | None = None) -> None:
    try:
        if "rng.torch_cpu" in tensors:
            torch.set_rng_state(tensors["rng.torch_cpu"].to(torch.uint8))
        cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        if cuda and torch.cuda.is_available():
            states = [tensors[k].to(torch.uint8) for k in cuda][: torch.cuda.device_count()]
            torch.cuda.set_rng_state_all(states)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{where or 'checkpoint'}: invalid RNG state: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------- save
def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def current_checkpoint(run_dir: Path) -> Path | None:
    """The directory the run's ``checkpoint`` pointer names, or None when the run has none yet."""
    pointer = Path(run_dir) / POINTER
    if not pointer.is_symlink() and not pointer.is_dir():
        aside = Path(run_dir) / COPIED_POINTER
        return aside.resolve() if aside.is_dir() else None
    target = pointer.resolve()
    if not target.is_dir():
        raise CheckpointError(f"{pointer} points at {target}, which does not exist")
    return target


def save_checkpoint(run_dir: Path, model, optimizer, state: dict[str, Any], train_config: dict[str, Any],
                    keep: int = 1) -> Path:
    """Write checkpoint ``state['step']`` and make it current (see the module docstring for the protocol).

    ``optimizer``: the optimizer, or its tensors already in :func:`optimizer_tensors`' layout (a distributed
    run gathers them by parameter name)."""
    run_dir = Path(run_dir)
    step = int(state["step"])
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = root / name
    current = current_checkpoint(run_dir)
    if current is not None and current.name == name and current.parent.resolve() == root.resolve():
        return final  # this step is the current checkpoint already
    staging = root / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        save_pretrained(model, staging, max_shard_bytes=1 << 62)  # one file: the top-level link names it
        _stage("weights")
        optim = optimizer if isinstance(optimizer, dict) else optimizer_tensors(optimizer)  # dict: gathered
        tensors = {**optim, **rng_tensors()}
        save_file(tensors, staging / TENSORS_FILE, metadata={"format": "nanoseek-training-state"})
        _stage("optimizer")
        body = {"version": STATE_VERSION, **state}
        (staging / STATE_FILE).write_text(json.dumps(body, indent=2) + "\n")
        (staging / CONFIG_FILE).write_text(json.dumps(train_config, indent=2) + "\n")
        for fname in TOKENIZER_FILES:
            src = run_dir / fname
            if src.is_file():
                shutil.copy2(src, staging / fname)
        fsync_tree(staging)
        _stage("staged")
        if final.exists():  # left by a save that was interrupted before the switch: not current
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _stage("renamed")
    pointer, aside = run_dir / POINTER, run_dir / COPIED_POINTER
    if pointer.is_dir() and not pointer.is_symlink():  # a copied run: its checkpoint is a directory, not a link
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(pointer, aside)
        fsync_dir(run_dir)
    _replace_symlink(pointer, f"{CHECKPOINTS}/{name}")
    _stage("switched")
    shutil.rmtree(aside, ignore_errors=True)
    for fname in HF_LINKS:
        link = run_dir / fname
        if not link.is_symlink() or os.readlink(link) != f"{POINTER}/{fname}":
            if link.exists() and not link.is_symlink():
                link.unlink()
            _replace_symlink(link, f"{POINTER}/{fname}")
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int = 1) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the current one) and interrupted saves."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    current = current_checkpoint(run_dir)
    steps = []
    for d in root.iterdir():
        if d.name.startswith(".") and ".tmp-" in d.name:
            shutil.rmtree(d, ignore_errors=True)
            continue
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir():
            steps.append((int(m.group(1)), d))
    steps.sort()
    newest = {d for _, d in steps[-keep:]}
    for _, d in steps:
        if d not in newest and (current is None or d.resolve() != current):
            shutil.rmtree(d, ignore_errors=True)
    for leftover in Path(run_dir).glob(".*.lnk"):
        leftover.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- load
_STATE_TYPES = {"step": int, "tokens": int, "elapsed": (int, float), "data": dict}


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} has no {STATE_FILE}: not a training checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path} has version {state.get('version')!r}; this nanoseek reads {STATE_VERSION}")
    for key, types in _STATE_TYPES.items():
        if not isinstance(state.get(key), types) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{path}: {key!r} is missing or has the wrong type")
    if state["step"] < 0 or state["tokens"] < 0:
        raise CheckpointError(f"{path}: negative step or token count")
    data = state["data"]
    if not all(isinstance(data.get(k), int) and data[k] >= 0 for k in ("epoch", "cursor")):
        raise CheckpointError(f"{path}: data position must be non-negative integers epoch and cursor")
    return state


def run_of_checkpoint(path: Path) -> Path | None:
    """The run that ``path`` is a checkpoint of (runs/x/checkpoint, runs/x/checkpoints/step-N -> runs/x), or
    None when ``path`` is not a checkpoint directory (a run, or anything else)."""
    path = Path(path)
    if current_checkpoint(path) is not None or not (path / STATE_FILE).is_file():
        return None
    return path.parent.parent if path.parent.name == CHECKPOINTS else path.parent


def run_progress(run_dir: Path) -> tuple[int, int] | None:
    """(step of the current checkpoint, the run's planned steps), or None before the run's first checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or current_checkpoint(run_dir) is None:
        return None
    _, state, saved = read_checkpoint_config(run_dir)
    return int(state["step"]), int(saved["steps"])


def read_checkpoint_config(run_dir: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(checkpoint dir, its trainer state, its train config dict) of a run directory, validated."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run directory")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    ckpt = current_checkpoint(run_dir)
    if ckpt is None:
        if (run := run_of_checkpoint(run_dir)) is not None:
            raise CheckpointError(f"{run_dir} is a checkpoint of the run {run}, not a run: resume the run with "
                                  f"--resume {run}")
        if (run_dir / CONFIG_FILE).is_file():
            raise CheckpointError(f"{run_dir} holds no checkpoint to resume: its training stopped before the first "
                                  "save; start it again (the same command without --resume)")
        raise CheckpointError(f"{run_dir} holds no checkpoint to resume (no {POINTER} link)")
    state = read_trainer_state(ckpt)
    try:
        cfg = json.loads((ckpt / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} has no {CONFIG_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ckpt / CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{ckpt / CONFIG_FILE} must hold a JSON object")
    return ckpt, state, cfg


def load_training_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / TENSORS_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no {TENSORS_FILE}")
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors errors: truncated / corrupt
        raise CheckpointError(f"cannot read {path}: {e}") from None


def load_model(ckpt: Path, device: torch.device):
    """The checkpoint's model in fp32 (master weights), routers and biases included."""
    return load_pretrained(ckpt, dtype=torch.float32, device=device)
