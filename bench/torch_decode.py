#!/usr/bin/python3
"""The PyTorch peer for the decode benchmark: the same Llama (a Hugging Face folder of f32
safetensors) run with a KV cache in plain PyTorch (Debian's python3-torch), prefill then greedy
decode, timed like `strata infer` (TTFT = prefill + first token; decode tokens/s after it).

    bench/torch_decode.py --model DIR --prompt-tokens 128 --max-tokens 32 --threads 2
Prints one JSON object."""
import argparse
import json
import os
import struct
import time

import numpy as np
import torch


def load(model_dir):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    path = os.path.join(model_dir, "model.safetensors")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    w = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F32", "the peer reads f32 models"
        b, e = meta["data_offsets"]
        arr = np.frombuffer(data[b:e], dtype="<f4").reshape(meta["shape"])
        w[name] = torch.from_numpy(np.array(arr))  # copy into RAM, like a loaded model
    return cfg, w


def rms(x, wt, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * wt


def rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


class Model:
    def __init__(self, cfg, w, max_seq):
        self.c, self.w = cfg, w
        self.H, self.KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd = cfg["hidden_size"] // self.H
        self.L = cfg["num_hidden_layers"]
        self.k = torch.zeros(self.L, max_seq, self.KV, self.hd)
        self.v = torch.zeros(self.L, max_seq, self.KV, self.hd)
        inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, self.hd, 2).float() / self.hd))
        f = torch.outer(torch.arange(max_seq).float(), inv)
        e = torch.cat((f, f), -1)
        self.cos, self.sin = e.cos()[:, None, :], e.sin()[:, None, :]

    def forward(self, ids, pos):
        w, eps, n = self.w, self.c["rms_norm_eps"], len(ids)
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]
        cos, sin = self.cos[pos:pos + n], self.sin[pos:pos + n]
        mask = torch.full((n, pos + n), float("-inf")).triu(pos + 1)
        for l in range(self.L):
            p = f"model.layers.{l}."
            h = rms(x, w[p + "input_layernorm.weight"], eps)
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, self.H, self.hd)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, self.KV, self.hd)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, self.KV, self.hd)
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            self.k[l, pos:pos + n], self.v[l, pos:pos + n] = k, v
            K = self.k[l, :pos + n].repeat_interleave(self.H // self.KV, 1)
            V = self.v[l, :pos + n].repeat_interleave(self.H // self.KV, 1)
            s = torch.einsum("qhd,khd->hqk", q, K) / self.hd ** 0.5 + mask
            a = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), V).reshape(n, -1)
            x = x + a @ w[p + "self_attn.o_proj.weight"].T
            h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
            g = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
            x = x + (g * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        x = rms(x[-1:], w["model.norm.weight"], eps)
        return (x @ w["lm_head.weight"].T)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg, w = load(a.model)
    m = Model(cfg, w, a.prompt_tokens + a.max_tokens + 1)
    ids = [3 + (i * 7) % 300 for i in range(a.prompt_tokens)]
    with torch.no_grad():
        t0 = time.perf_counter()
        tok = int(m.forward(ids, 0).argmax())
        t1 = time.perf_counter()
        for i in range(a.max_tokens - 1):
            tok = int(m.forward([tok], a.prompt_tokens + i).argmax())
        t2 = time.perf_counter()
    print(json.dumps({"peer": "pytorch " + torch.__version__, "threads": a.threads,
                      "prompt_tokens": a.prompt_tokens, "ttft_ms": (t1 - t0) * 1e3,
                      "prefill_tokens_per_s": a.prompt_tokens / (t1 - t0),
                      "decode_tokens_per_s": (a.max_tokens - 1) / (t2 - t1)}))


if __name__ == "__main__":
    main()
