#!/usr/bin/python3
"""PyTorch autograd reference for kernels/train.h, run by tests/kernels_train_test.cc.

Usage: train_ops_ref.py DIR

DIR/manifest.txt has one case per line: `NAME OP INT...`. Inputs are DIR/NAME.<input> files of raw
little-endian float32 (int32 for ids, positions and targets). For each case this writes the
forward outputs and the gradients torch autograd computes, as DIR/NAME.<output>.out (float32),
independently of the C++ code: every op is written from its textbook definition (attention as
softmax(QK^T * scale + causal mask) V with GQA by repeat_interleave, RoPE as transformers'
rotate_half, cross-entropy via torch.nn.functional.cross_entropy with ignore_index=-1 and
reduction='sum') and differentiated by torch. Math runs in float64 except AdamW, which runs
torch.optim.AdamW on float32 parameters as training does.
Exit status 0 on success; anything else means the reference could not be computed.
"""
import os
import sys

import numpy as np
import torch


def read(dir_, name, suffix, count, dtype=np.float32):
    a = np.fromfile(os.path.join(dir_, f"{name}.{suffix}"), dtype=dtype)
    if a.size != count:
        raise ValueError(f"{name}.{suffix}: {a.size} values, expected {count}")
    t = torch.from_numpy(a.copy())
    return t.double() if dtype == np.float32 else t.long()


def write(dir_, name, field, t):
    path = os.path.join(dir_, f"{name}.{field}.out")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(t.detach().to(torch.float32).contiguous().numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def leaf(t):
    return t.clone().requires_grad_(True)


def matmul(d, name, m, n, k):
    x = leaf(read(d, name, "x", m * k).reshape(m, k))
    w = leaf(read(d, name, "w", n * k).reshape(n, k))
    dy = read(d, name, "dy", m * n).reshape(m, n)
    y = x @ w.T
    y.backward(dy)
    return {"y": y, "dx": x.grad, "dw": w.grad}


def rmsnorm(d, name, rows, dim):
    x = leaf(read(d, name, "x", rows * dim).reshape(rows, dim))
    w = leaf(read(d, name, "w", dim))
    dy = read(d, name, "dy", rows * dim).reshape(rows, dim)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    y.backward(dy)
    return {"dx": x.grad, "dw": w.grad}


def rope_fwd(x, positions, theta, head_dim):
    # transformers.models.llama.modeling_llama: LlamaRotaryEmbedding and apply_rotary_pos_emb.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :].double(), emb.sin()[:, None, :].double()

    def rotate_half(v):
        v1, v2 = v[..., : v.shape[-1] // 2], v[..., v.shape[-1] // 2:]
        return torch.cat((-v2, v1), dim=-1)

    return x * cos + rotate_half(x) * sin


def rope(d, name, t, h, dim, theta):
    x = leaf(read(d, name, "x", t * h * dim).reshape(t, h, dim))
    pos = read(d, name, "pos", t, np.int32)
    dy = read(d, name, "dy", t * h * dim).reshape(t, h, dim)
    rope_fwd(x, pos, float(theta), dim).backward(dy)
    return {"dx": x.grad}


def swiglu(d, name, n):
    g = leaf(read(d, name, "gate", n))
    u = leaf(read(d, name, "up", n))
    dout = read(d, name, "dout", n)
    (torch.nn.functional.silu(g) * u).backward(dout)
    return {"dgate": g.grad, "dup": u.grad}


def embedding(d, name, vocab, dim, n):
    table = leaf(read(d, name, "table", vocab * dim).reshape(vocab, dim))
    ids = read(d, name, "ids", n, np.int32)
    dout = read(d, name, "dout", n * dim).reshape(n, dim)
    out = torch.nn.functional.embedding(ids, table)
    out.backward(dout)
    return {"out": out, "dtable": table.grad}


def attention(d, name, b, t, h, kv, dim):
    q = leaf(read(d, name, "q", b * t * h * dim).reshape(b, t, h, dim))
    k = leaf(read(d, name, "k", b * t * kv * dim).reshape(b, t, kv, dim))
    v = leaf(read(d, name, "v", b * t * kv * dim).reshape(b, t, kv, dim))
    dout = read(d, name, "dout", b * t * h * dim).reshape(b, t, h, dim)
    kr = k.repeat_interleave(h // kv, dim=2)  # head i reads kv head i // (h / kv)
    vr = v.repeat_interleave(h // kv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, kr) / (dim ** 0.5)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, h, t]
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), vr)
    out.backward(dout)
    return {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def cross_entropy(d, name, n, dim, vocab, scale_e9):
    x = leaf(read(d, name, "x", n * dim).reshape(n, dim))
    w = leaf(read(d, name, "w", vocab * dim).reshape(vocab, dim))
    tgt = read(d, name, "tgt", n, np.int32)
    loss = torch.nn.functional.cross_entropy(x @ w.T, tgt, ignore_index=-1, reduction="sum")
    (loss * (scale_e9 * 1e-9)).backward()
    return {"loss": loss.reshape(1), "dx": x.grad, "dw": w.grad}


def adamw(d, name, n, steps):
    w0 = read(d, name, "w", n).float()
    g = read(d, name, "g", steps * n).float().reshape(steps, n)
    p = torch.nn.Parameter(w0.clone())
    # The hyperparameters as the float32 values the C++ AdamWParams holds (0.999f is not 0.999:
    # 1 - beta2 would differ by 1.3e-5 relative, which is the precision under test).
    f = lambda a: float(np.float32(a))
    opt = torch.optim.AdamW([p], lr=f(1e-2), betas=(f(0.9), f(0.999)), eps=f(1e-8),
                            weight_decay=f(0.1))
    for s in range(steps):
        p.grad = g[s] * 0.5  # the C++ side passes grad_scale = 0.5
        opt.step()
    st = opt.state[p]
    return {"w": p, "m": st["exp_avg"], "v": st["exp_avg_sq"]}


OPS = {"matmul": matmul, "rmsnorm": rmsnorm, "rope": rope, "swiglu": swiglu,
       "embedding": embedding, "attention": attention, "ce": cross_entropy, "adamw": adamw}


def main():
    torch.set_default_dtype(torch.float64)
    dir_ = sys.argv[1]
    with open(os.path.join(dir_, "manifest.txt")) as f:
        lines = [l.split() for l in f if l.strip()]
    for fields in lines:
        name, op, args = fields[0], fields[1], [int(a) for a in fields[2:]]
        for field, t in OPS[op](dir_, name, *args).items():
            write(dir_, name, field, t)


if __name__ == "__main__":
    main()
