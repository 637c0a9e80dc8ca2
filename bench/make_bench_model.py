#!/usr/bin/python3
"""Writes a random-weight Llama with the shape of TinyLlama-1.1B (hidden 2048, 22 layers, 32
heads, 4 KV heads, FFN 5632, vocab 32000) as a Hugging Face folder, for decode benchmarks.
Weights are never committed; this script makes them (~4.4 GB in f32).

    bench/make_bench_model.py --out /tmp/tl-bench [--layers 22] [--tokenizer tokenizer.model]

The tokenizer is only needed to turn a prompt into ids below the vocabulary size: pass any
SentencePiece model (e.g. one written by tests/reference/make_tiny_llama.py)."""
import argparse
import json
import os
import shutil
import struct

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    hidden, heads, kv, inter, vocab = 2048, 32, 4, 5632, 32000
    hd = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for l in range(a.layers):
        p = f"model.layers.{l}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (heads * hd, hidden)),
                   (p + "self_attn.k_proj.weight", (kv * hd, hidden)),
                   (p + "self_attn.v_proj.weight", (kv * hd, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)),
                   (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    header, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    tmp = a.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rng = np.random.default_rng(a.seed)
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes:
            if len(shape) == 1:
                arr = np.ones(shape, dtype=np.float32)
            else:
                arr = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype("<f4")
            f.write(arr.tobytes())
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": a.layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", "hidden_act": "silu"}
    json.dump(cfg, open(os.path.join(tmp, "config.json"), "w"), indent=1)
    shutil.copy(a.tokenizer, os.path.join(tmp, "tokenizer.model"))
    shutil.rmtree(a.out, ignore_errors=True)
    os.rename(tmp, a.out)
    print(f"wrote {a.out}: {off / 2**30:.2f} GiB of f32 weights")


if __name__ == "__main__":
    main()
