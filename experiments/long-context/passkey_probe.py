"""Diagnostics of the passkey task on the experiment's base model (why every passkey accuracy is 0 here).

    python experiments/long-context/passkey_probe.py [BASE_RUN]     (default /tmp/nanoseek-exp/long-context/base)

1. Needle gain: log p(key | the needle shows this key) - log p(key | the needle shows another key), same filler,
   depth and length, summed over the key's tokens, teacher-forced. 0 means the model ignores the needle.
2. Passkey-only fine-tuning at L = 128: 80 AdamW steps (lr 1e-3) of 16 fresh training examples each, exact-match
   accuracy on 30 held-out examples every 20 steps. Does the model learn retrieval quickly when given nothing else?
One torch thread; about 2 minutes of one core.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from nanoseek.eval_long import passkey_correct
from nanoseek.hf import load_pretrained
from nanoseek.passkey import TRAIN_DEPTHS, PasskeyMaker, passkey_examples
from nanoseek.train.tokenizer_train import load_tokenizer


def key_logprob(model, ids: list[int], answer_len: int) -> float:
    logp = torch.log_softmax(model(torch.tensor([[0] + ids]))[0].float(), -1)
    n = len(ids) + 1
    return sum(logp[n - answer_len - 1 + j, ids[-answer_len + j]].item() for j in range(answer_len))


@torch.no_grad()
def needle_gain(model, maker: PasskeyMaker, length: int, n: int, rng: random.Random) -> float:
    gains = []
    for i in range(n):
        key, other = str(rng.randrange(10000, 100000)), str(rng.randrange(10000, 100000))
        depth, phase = (0.0, 0.4, 1.0)[i % 3], rng.randrange(len(maker.words))
        e, c = maker.make(length, depth, key, phase), maker.make(length, depth, other, phase)
        control = c.ids[: -c.answer_len] + e.ids[-e.answer_len:]  # the other key in the needle, this key asked
        gains.append(key_logprob(model, e.ids, e.answer_len) - key_logprob(model, control, e.answer_len))
    return sum(gains) / len(gains)


def main() -> int:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default="/tmp/nanoseek-exp/long-context/base", help="the base run directory")
    run = p.parse_args().run
    model = load_pretrained(run, dtype=torch.float32).eval()
    tok = load_tokenizer(f"{run}/tokenizer.json")
    maker = PasskeyMaker(tok)
    test = passkey_examples(tok, [128], [0.0, 0.4, 1.0], 10, 7)
    print(f"base exact-match at 128 tokens: {sum(passkey_correct(model, test, 0))}/{len(test)}")
    rng = random.Random(3)
    for length in (128, 256, 512):
        print(f"needle gain at {length} tokens: {needle_gain(model, maker, length, 20, rng):+.3f} nats per key "
              "(20 examples)")
    rng, t0 = random.Random(0), time.time()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(1, 81):
        batch = [maker.make(128, rng.choice(TRAIN_DEPTHS), str(rng.randrange(10000, 100000)), rng.randrange(18))
                 for _ in range(16)]
        x = torch.tensor([[0] + e.ids + [1] for e in batch])
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0:
            model.eval()
            hits = sum(passkey_correct(model, test, 0))
            print(f"passkey-only fine-tuning step {step}: loss {loss.item():.3f}, exact match {hits}/{len(test)} "
                  f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
