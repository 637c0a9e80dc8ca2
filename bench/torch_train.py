#!/usr/bin/python3
"""The PyTorch peer of `strata train` for benchmarks: the same Llama (HF equations, batched:
RMSNorm, RoPE, GQA causal attention with an explicit softmax — torch 1.13 has no fused
attention — SwiGLU, untied LM head), the same mean cross-entropy, clip_grad_norm_ and
torch.optim.AdamW, trained on random token batches of the same shape. Autograd keeps every
activation, as a plain PyTorch training loop does.

--precision bf16 runs the forward under torch.autocast("cpu", dtype=torch.bfloat16), PyTorch's
own mixed precision on the CPU (torch 1.13: matrix products in bf16 through oneDNN, master
weights, gradients and AdamW in f32), the peer of `strata train --precision bf16`.

    torch_train.py --config CONFIG.json --vocab V --batch B --seq T --steps S [--threads N]
                   [--precision f32|bf16]

Prints one JSON object: tokens_per_s (median over the steps after the first), step_s, peak_rss_bytes.
Run with the same OPENBLAS_* / OMP_* environment and thread count as strata.
"""
import argparse
import json
import resource
import statistics
import time

import torch


def build(cfg, vocab, gen):
    d = cfg["hidden_size"]
    h = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", h)
    hd = d // h
    inter = cfg["intermediate_size"]
    p = {}

    def mat(name, rows, cols):
        p[name] = torch.nn.Parameter(torch.randn(rows, cols, generator=gen) * 0.02)

    mat("embed", vocab, d)
    for i in range(cfg["num_hidden_layers"]):
        p[f"{i}.n1"] = torch.nn.Parameter(torch.ones(d))
        mat(f"{i}.q", h * hd, d)
        mat(f"{i}.k", kv * hd, d)
        mat(f"{i}.v", kv * hd, d)
        mat(f"{i}.o", d, h * hd)
        p[f"{i}.n2"] = torch.nn.Parameter(torch.ones(d))
        mat(f"{i}.g", inter, d)
        mat(f"{i}.u", inter, d)
        mat(f"{i}.d", d, inter)
    p["norm"] = torch.nn.Parameter(torch.ones(d))
    mat("head", vocab, d)
    return p


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rot(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def loss_fn(cfg, p, tokens):
    B, T1 = tokens.shape
    T = T1 - 1
    d = cfg["hidden_size"]
    h = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", h)
    hd = d // h
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    f = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    emb = torch.cat((f, f), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    mask = torch.full((T, T), float("-inf")).triu(1)
    x = p["embed"][ids]
    for i in range(cfg["num_hidden_layers"]):
        a = rms(x, p[f"{i}.n1"], eps)
        q = (a @ p[f"{i}.q"].T).view(B, T, h, hd).transpose(1, 2)
        k = (a @ p[f"{i}.k"].T).view(B, T, kv, hd).transpose(1, 2)
        v = (a @ p[f"{i}.v"].T).view(B, T, kv, hd).transpose(1, 2)
        q = q * cos + rot(q) * sin
        k = k * cos + rot(k) * sin
        k = k.repeat_interleave(h // kv, dim=1)
        v = v.repeat_interleave(h // kv, dim=1)
        s = (q @ k.transpose(-1, -2)) / hd ** 0.5 + mask
        o = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, T, h * hd)
        x = x + o @ p[f"{i}.o"].T
        b = rms(x, p[f"{i}.n2"], eps)
        x = x + (torch.nn.functional.silu(b @ p[f"{i}.g"].T) * (b @ p[f"{i}.u"].T)) @ p[f"{i}.d"].T
    x = rms(x, p["norm"], eps)
    logits = x @ p["head"].T
    return torch.nn.functional.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--precision", choices=("f32", "bf16"), default="f32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = json.load(open(a.config))
    gen = torch.Generator().manual_seed(0)
    p = build(cfg, a.vocab, gen)
    decay = [v for k, v in p.items() if not (k.endswith("n1") or k.endswith("n2") or k == "norm")]
    no_decay = [v for k, v in p.items() if k.endswith("n1") or k.endswith("n2") or k == "norm"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))
    times, losses = [], []
    for step in range(a.steps):
        tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            loss = loss_fn(cfg, p, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    steady = times[1:] if len(times) > 1 else times
    step_s = statistics.median(steady)
    print(json.dumps({
        "tokens_per_s": a.batch * a.seq / step_s,
        "step_s": step_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "params": sum(v.numel() for v in p.values()),
        "losses": losses,
        "threads": a.threads,
        "precision": a.precision,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
