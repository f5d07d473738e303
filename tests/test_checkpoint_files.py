"""The training state's files read back with their checks (nanoseek/train/checkpoint.py: trainer_state.json
type-checked, AdamW moments matched to the parameters by name and shape) and the memory estimate's bytes and
its two error messages (nanoseek/train/memory.py), on tiny hand-made inputs."""

import dataclasses
import json

import pytest
import torch

from nanoseek import DeepSeekV3, ModelConfig
from nanoseek.hf import CheckpointError
from nanoseek.train import TrainConfig
from nanoseek.train import memory
from nanoseek.train.checkpoint import current_checkpoint, load_optimizer_tensors, read_trainer_state, save_checkpoint


def write_state(tmp_path, **changes):
    state = {"version": 1, "step": 3, "tokens": 96, "elapsed": 1.5, "data": {"epoch": 0, "cursor": 7}, **changes}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    return tmp_path


def test_trainer_state_is_type_checked(tmp_path):
    """A valid state reads back; a negative step or token count, a boolean step (JSON true is no step count) and
    a negative data position are errors, not a resume from a wrong place."""
    assert read_trainer_state(write_state(tmp_path))["data"] == {"epoch": 0, "cursor": 7}
    bad = [({"step": -1}, "negative step"), ({"tokens": -5}, "negative step"), ({"step": True}, "'step' is missing"),
           ({"data": {"epoch": 0, "cursor": -1}}, "non-negative integers"),
           ({"data": {"epoch": 0}}, "non-negative integers"), ({"version": 2}, "has version 2")]
    for change, message in bad:
        with pytest.raises(CheckpointError, match=message):
            read_trainer_state(write_state(tmp_path, **change))


def adamw(seed):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    names, params = zip(*layer.named_parameters())
    return layer, torch.optim.AdamW([{"params": list(params), "names": list(names)}])


def test_optimizer_moments_are_matched_by_name_and_shape():
    """The moments of each parameter go back to that parameter; a moment of another shape, a missing one or an
    entry for no parameter is an error naming it (a model changed since the checkpoint)."""
    def saved():  # one AdamW step's state by name, as the checkpoint stores it: exp_avg = 0.1 * grad
        layer, opt = adamw(0)
        layer(torch.ones(2, 4)).sum().backward()
        opt.step()
        grads = {"weight": layer.weight.grad.clone(), "bias": layer.bias.grad.clone()}
        return {f"optim.{n}.{k}": v.clone() for n, p in layer.named_parameters()
                for k, v in opt.state[p].items()}, grads

    tensors, grads = saved()
    layer, opt = adamw(1)
    load_optimizer_tensors(opt, tensors, "ckpt")
    torch.testing.assert_close(opt.state[layer.weight]["exp_avg"], 0.1 * grads["weight"])  # (1 - beta1) g
    torch.testing.assert_close(opt.state[layer.bias]["exp_avg_sq"], 0.001 * grads["bias"] ** 2)  # (1 - beta2) g^2
    cases = [({"optim.weight.exp_avg": torch.zeros(4, 3)}, r"optim.weight.exp_avg has shape \(4, 3\)"),
             ({"optim.head.weight.exp_avg": torch.zeros(3)}, "1 unexpected entries .e.g. optim.head.weight.exp_avg"),
             ({"optim.bias.step": torch.tensor(1)}, "optim.bias.step is not a float tensor")]
    for change, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_optimizer_tensors(adamw(1)[1], {**tensors, **change}, "ckpt")
    with pytest.raises(CheckpointError, match="missing optim.bias.exp_avg_sq"):
        load_optimizer_tensors(adamw(1)[1], {k: v for k, v in tensors.items() if k != "optim.bias.exp_avg_sq"}, "c")
    # bf16 parameters (--dtype bf16-weights): the step count stays exact (257 is no bf16 number: 256 or 258)
    layer, opt = adamw(1)
    layer.to(torch.bfloat16)
    load_optimizer_tensors(opt, {**tensors, "optim.weight.step": torch.tensor(257.0, dtype=torch.float64)}, "c")
    assert opt.state[layer.weight]["step"].item() == 257


def test_memory_estimate_and_its_messages(monkeypatch):
    """Weights, gradients and AdamW's two moments in fp32: 16 bytes a parameter. Each vocabulary entry adds, per
    token of the micro-batch and per head (main + MTP), one logit in the activation dtype plus three fp32 copies
    (the loss's logits and the gradients): 16 bytes in fp32, 14 under bf16 autocast; activation checkpointing
    lowers the estimate. Too little memory for the state alone asks for a smaller model, for the activations a
    smaller batch."""
    mc = ModelConfig.preset("tiny")
    cfg = TrainConfig(preset="tiny", batch_size=2, seq_len=32, dtype="fp32")
    est = memory.estimate_memory(mc, cfg)
    assert est["params"] == sum(p.numel() for p in DeepSeekV3(mc).parameters())
    assert est["state"] == 16 * est["params"] and est["total"] == est["state"] + est["activations"]
    N, heads = 64, 1 + mc.num_nextn_predict_layers
    assert heads == 2
    wider = dataclasses.replace(mc, vocab_size=mc.vocab_size + 100)
    for dtype, per_logit in (("fp32", 16), ("bf16", 14)):
        c = dataclasses.replace(cfg, dtype=dtype)
        delta = memory.estimate_memory(wider, c)["activations"] - memory.estimate_memory(mc, c)["activations"]
        assert delta == N * 100 * heads * per_logit, dtype
    ckpt = memory.estimate_memory(mc, dataclasses.replace(cfg, activation_checkpointing=True))
    assert ckpt["activations"] < est["activations"] and ckpt["state"] == est["state"]
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "available_memory", lambda device: est["state"] + est["activations"] // 2)
    with pytest.raises(ValueError, match="a micro-batch of 2 x 32 tokens needs about .*lower --batch-size"):
        memory.check_memory(mc, cfg, cpu)
    monkeypatch.setattr(memory, "available_memory", lambda device: est["state"] - 1)
    with pytest.raises(ValueError, match="AdamW state alone.*choose a smaller --preset"):
        memory.check_memory(mc, cfg, cpu)
    monkeypatch.setattr(memory, "available_memory", lambda device: est["total"])
    assert memory.check_memory(mc, cfg, cpu) == est
    # --dtype bf16 is checked at the bytes it trains with: fp32 where bf16 products are not native
    bf16 = dataclasses.replace(cfg, dtype="bf16")
    for native, expected in ((True, memory.estimate_memory(mc, bf16)), (False, est)):
        monkeypatch.setattr("nanoseek.devices.native_bf16", lambda device: native)
        assert memory.check_memory(mc, bf16, cpu) == expected
    assert memory.estimate_memory(mc, bf16)["activations"] < est["activations"]


def test_current_checkpoint_follows_the_pointer_or_the_copied_one_set_aside(tmp_path):
    """`checkpoint` names the current checkpoint; while a copied run's next save has moved its `checkpoint`
    directory aside (`.checkpoint.copied`) and not yet linked the new one, that directory is current; a link to
    nothing is an error, a run without either has none."""
    assert current_checkpoint(tmp_path) is None
    (tmp_path / ".checkpoint.copied").mkdir()
    assert current_checkpoint(tmp_path) == (tmp_path / ".checkpoint.copied").resolve()
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "checkpoint").symlink_to("checkpoints/step-00000002")
    assert current_checkpoint(tmp_path) == (tmp_path / "checkpoints" / "step-00000002").resolve()
    (tmp_path / "checkpoints" / "step-00000002").rmdir()
    with pytest.raises(CheckpointError, match="which does not exist"):
        current_checkpoint(tmp_path)


def test_saving_the_current_step_again_leaves_it_in_place(tmp_path):
    """A second save of the step that is already current (the last step saved by --save-every and again at the
    end) keeps that checkpoint directory as it is: rewriting it deletes the current checkpoint before its copy
    is renamed in, and a kill in between would leave a run with no checkpoint."""
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    state = {"step": 2, "tokens": 64, "elapsed": 0.0, "data": {"epoch": 0, "cursor": 0}}
    first = save_checkpoint(tmp_path, model, {}, state, {})
    inode = first.stat().st_ino
    assert save_checkpoint(tmp_path, model, {}, state, {}) == first
    assert first.stat().st_ino == inode and current_checkpoint(tmp_path) == first.resolve()
    assert [d.name for d in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
