#!/usr/bin/python3
"""PyTorch reference of strata's training step, independent of strata: the Llama forward of
llama_ref.py under autograd, mean cross-entropy over every target token of the batch,
torch.nn.utils.clip_grad_norm_, and torch.optim.AdamW with two parameter groups (weight decay on
matrices and the embedding, none on norm gains) and a linear-warmup + cosine learning rate.

    train_ref.py --model DIR --tokens FILE --batch B --seq T --steps S [optimizer flags]
                 --out-losses FILE [--out-grads FILE.safetensors] [--out-weights FILE.safetensors]

FILE holds int32 ids [S, B, T + 1] (inputs and shifted targets, as strata cuts them). With
--steps 0 only the gradients of the first batch are computed (--out-grads, before clipping).
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_ref import forward, load  # noqa: E402


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, t in tensors:
        raw = t.detach().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def batch_loss(cfg, w, batch):
    """Mean over every target token of the batch; sequences run one by one (causal within each)."""
    total = 0.0
    count = 0
    for row in batch:
        logits = forward(cfg, w, [int(t) for t in row[:-1]])
        targets = torch.tensor(row[1:], dtype=torch.long)
        total = total + torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        count += len(row) - 1
    return total / count


def scheduled_lr(a, step):
    if a.warmup > 0 and step <= a.warmup:
        return a.lr * step / a.warmup
    decay = max(1, a.total_steps - a.warmup)
    progress = min(max((step - a.warmup) / decay, 0.0), 1.0)
    min_lr = a.lr * a.min_lr_ratio
    return min_lr + (a.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--total-steps", type=int, default=0, help="for the schedule (default --steps)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--out-losses", required=True)
    ap.add_argument("--out-grads")
    ap.add_argument("--out-weights")
    a = ap.parse_args()
    if a.total_steps == 0:
        a.total_steps = a.steps
    torch.set_num_threads(1)
    cfg, w = load(a.model)
    names = list(w.keys())
    params = {n: w[n].clone().requires_grad_(True) for n in names}
    tokens = np.fromfile(a.tokens, dtype="<i4").reshape(max(a.steps, 1), a.batch, a.seq + 1)
    decay = [params[n] for n in names if "norm" not in n]
    no_decay = [params[n] for n in names if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps)
    losses = []
    for step in range(1, max(a.steps, 1) + 1):
        opt.zero_grad()
        loss = batch_loss(cfg, params, tokens[step - 1])
        loss.backward()
        losses.append(float(loss))
        if step == 1 and a.out_grads:
            write_safetensors(a.out_grads, [(n, params[n].grad) for n in names])
        if a.steps == 0:
            break
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), a.clip)
        for g in opt.param_groups:
            g["lr"] = scheduled_lr(a, step)
        opt.step()
    np.array(losses, dtype="<f8").tofile(a.out_losses)
    if a.out_weights:
        write_safetensors(a.out_weights, [(n, params[n]) for n in names])


if __name__ == "__main__":
    main()
