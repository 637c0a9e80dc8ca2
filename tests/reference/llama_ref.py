#!/usr/bin/python3
"""PyTorch reference of a Llama forward pass, written from the Hugging Face modeling code's
equations (RMSNorm in f32, rotate_half RoPE, GQA by repeat_interleave, causal softmax banded to
the config's sliding_window where it has one, SwiGLU),
independent of strata. Reads a Hugging Face folder (config.json + model.safetensors or a sharded
index) and writes the logits of every position as raw little-endian f32 [n, vocab].

    llama_ref.py --model DIR --tokens 1,5,9 --out logits.f32
    llama_ref.py --model DIR --tokens 1,5,9 --generate 32 --out greedy.json [--logits-out L.f32]

With --generate N it decodes greedily instead: N times, the full forward is re-run on the whole
growing sequence (no KV cache, so nothing is shared with an incremental engine) and the argmax
of the last position is appended; it stops early at the config's eos_token_id, which is not
appended (as `strata infer` does). The JSON holds "prompt", "tokens" (the generated ids) and
"min_margin" (smallest gap between the best and second-best logit over the steps, to tell a
near-tie from a real mismatch). --logits-out also writes the logits of every position of
prompt + generated tokens, [n + generated, vocab] as above.
"""
import argparse
import json
import os
import struct

import numpy as np
import torch

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        raw = data[b:e]
        if meta["dtype"] == "BF16":
            u16 = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = u16.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=DTYPES[meta["dtype"]]).astype(np.float32)
        out[name] = torch.from_numpy(arr.reshape(meta["shape"]).copy())
    return out


def load(model_dir):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    index = os.path.join(model_dir, "model.safetensors.index.json")
    weights = {}
    if os.path.exists(index):
        for shard in sorted(set(json.load(open(index))["weight_map"].values())):
            weights.update(read_safetensors(os.path.join(model_dir, shard)))
    else:
        weights = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    return cfg, weights


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def forward(cfg, w, tokens):
    hidden = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_heads)
    hd = cfg.get("head_dim") or hidden // n_heads
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    n = len(tokens)
    ids = torch.tensor(tokens, dtype=torch.long)
    x = w["model.embed_tokens.weight"][ids]
    pos = torch.arange(n, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    mask = torch.full((n, n), float("-inf")).triu(1)
    window = cfg.get("sliding_window") or 0
    if window > 0:
        # Mistral: a query sees the last `window` keys, itself included (transformers' mask).
        mask = mask + torch.full((n, n), float("-inf")).tril(-window)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, n_heads, hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, n_kv, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, n_kv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / (hd ** 0.5) + mask
        att = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v).reshape(n, n_heads * hd)
        x = x + att @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (g * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--out", required=True)
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="greedily decode N tokens; --out gets JSON")
    ap.add_argument("--logits-out", help="with --generate: logits of prompt + generated tokens")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg, w = load(args.model)
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.generate <= 0:
        with torch.no_grad():
            logits = forward(cfg, w, tokens)
        logits.numpy().astype("<f4").tofile(args.out)
        return
    eos = cfg.get("eos_token_id")
    seq = list(tokens)
    min_margin = float("inf")
    with torch.no_grad():
        for _ in range(args.generate):
            last = forward(cfg, w, seq)[-1]
            top2 = torch.topk(last, 2).values
            min_margin = min(min_margin, float(top2[0] - top2[1]))
            nxt = int(torch.argmax(last))
            if nxt == eos:
                break
            seq.append(nxt)
        if args.logits_out:
            forward(cfg, w, seq).numpy().astype("<f4").tofile(args.logits_out)
    result = {"prompt": tokens, "tokens": seq[len(tokens):], "min_margin": min_margin}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
