#!/usr/bin/python3
"""PyTorch reference for kernels/ops.h, run by tests/kernels_ops_test.cc.

Usage: kernels_ref.py DIR

DIR/manifest.txt has one case per line: `NAME OP INT...`. Inputs are DIR/NAME.<input> files of raw
little-endian float32 (int32 for positions, q8_0 rows for .q8: per row K int8, then K/32 f16
scales, as kernels/quant.h lays them out); for each case this writes
DIR/NAME.out (float32) computed with torch, independently of the C++ code: bf16 rounding is done
by torch, q8_0 rows are decoded here from their bytes, RoPE follows transformers'
LlamaRotaryEmbedding + rotate_half, attention is softmax(QK^T * scale + causal mask) V.
Exit status 0 on success; anything else means the reference could not be computed.
"""
import os
import sys

import numpy as np
import torch


def read(dir_, name, suffix, count=None, dtype=np.float32):
    a = np.fromfile(os.path.join(dir_, f"{name}.{suffix}"), dtype=dtype)
    if count is not None and a.size != count:
        raise ValueError(f"{name}.{suffix}: {a.size} values, expected {count}")
    return torch.from_numpy(a.copy())


def write(dir_, name, t):
    path = os.path.join(dir_, f"{name}.out")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(t.detach().to(torch.float32).contiguous().numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dequant_q8_0(raw, n, k):
    rows = np.frombuffer(raw, dtype=np.dtype([("qs", "i1", (k,)), ("d", "<f2", (k // 32,))]))
    assert rows.size == n, (rows.size, n, k)
    d = np.repeat(rows["d"].astype(np.float32), 32, axis=1)
    w = d * rows["qs"].astype(np.float32)
    return torch.from_numpy(w.reshape(n, k))


def linear(dir_, name, wtype, m, n, k):
    x = read(dir_, name, "x", m * k).reshape(m, k)
    if wtype == "q8_0":
        with open(os.path.join(dir_, f"{name}.q8"), "rb") as f:
            w = dequant_q8_0(f.read(), n, k)
    else:
        w = read(dir_, name, "w", n * k).reshape(n, k)
        if wtype == "bf16":
            w = w.to(torch.bfloat16).to(torch.float32)
    # float64 so the reference's own rounding is far below the tolerance under test.
    return x.double() @ w.double().T


def rope(x, positions, theta, head_dim):
    # transformers.models.llama.modeling_llama: LlamaRotaryEmbedding and apply_rotary_pos_emb.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]

    def rotate_half(v):
        v1, v2 = v[..., : v.shape[-1] // 2], v[..., v.shape[-1] // 2:]
        return torch.cat((-v2, v1), dim=-1)

    return x * cos + rotate_half(x) * sin


def main():
    dir_ = sys.argv[1]
    with open(os.path.join(dir_, "manifest.txt")) as f:
        lines = [l.split() for l in f if l.strip()]
    for fields in lines:
        name, op, args = fields[0], fields[1], [int(a) for a in fields[2:]]
        if op.startswith("linear_"):
            out = linear(dir_, name, op[len("linear_"):], *args)
        elif op == "rmsnorm":
            rows, dim, eps_e9 = args
            x = read(dir_, name, "x", rows * dim).reshape(rows, dim)
            w = read(dir_, name, "w", dim)
            var = x.pow(2).mean(-1, keepdim=True)  # LlamaRMSNorm
            out = w * (x * torch.rsqrt(var + eps_e9 * 1e-9))
        elif op == "rope":
            t, h, d, theta = args
            x = read(dir_, name, "x", t * h * d).reshape(t, h, d)
            pos = read(dir_, name, "pos", t, np.int32)
            out = rope(x, pos, float(theta), d)
        elif op == "softmax":
            rows, cols = args
            out = torch.softmax(read(dir_, name, "x", rows * cols).reshape(rows, cols), dim=-1)
        elif op == "swiglu":
            (n,) = args
            g, u = read(dir_, name, "gate", n), read(dir_, name, "up", n)
            out = torch.nn.functional.silu(g) * u
        elif op == "attention":
            # An optional sixth field is a sliding window: the last `window` keys, itself included.
            t, h, kvh, d, max_seq = args[:5]
            window = args[5] if len(args) > 5 else 0
            q = read(dir_, name, "q", t * h * d).reshape(t, h, d)
            kc = read(dir_, name, "k", max_seq * kvh * d).reshape(max_seq, kvh, d)
            vc = read(dir_, name, "v", max_seq * kvh * d).reshape(max_seq, kvh, d)
            pos = read(dir_, name, "pos", t, np.int32).long()
            group = h // kvh
            k = kc.repeat_interleave(group, dim=1).transpose(0, 1)  # [h, max_seq, d]
            v = vc.repeat_interleave(group, dim=1).transpose(0, 1)
            scores = torch.matmul(q.transpose(0, 1), k.transpose(1, 2)) / (d ** 0.5)  # [h, t, S]
            mask = torch.arange(max_seq)[None, :] > pos[:, None]  # [t, S]
            if window > 0:
                mask |= torch.arange(max_seq)[None, :] <= pos[:, None] - window
            scores = scores.masked_fill(mask[None], float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(0, 1)  # [t, h, d]
        else:
            raise ValueError(f"unknown op {op}")
        write(dir_, name, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
