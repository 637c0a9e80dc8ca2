#!/usr/bin/env python3
"""Writes a tiny random Llama as a real Hugging Face folder, for strata's runtime tests.

    make_tiny_llama.py --out DIR [--shards 1|2] [--dtype f32|bf16] [--tied]
                       [--tokenizer EXISTING.model] [--seed 0]
                       [--hidden 64] [--layers 2] [--heads 4] [--kv-heads 2] [--intermediate 160]
                       [--sliding-window W]

DIR gets config.json, model.safetensors (or model-0000K-of-0000N.safetensors shards plus
model.safetensors.index.json), tokenizer.model (trained here with SentencePiece's own trainer,
Llama-style: BPE with byte fallback, unk=0 bos=1 eos=2, or copied from --tokenizer), and two
files of expected values that do not depend on strata's parser:

  checksums.json        per tensor: dtype, shape, float64 sum of its values and the first four
                        values (after rounding to bf16 when --dtype bf16), computed with numpy
  tokenizer_expected.json  strings with the ids python-sentencepiece gives for them

The safetensors files are written by hand (8-byte little-endian header length, JSON header,
raw little-endian bytes), since the safetensors package is not a dependency. The weights come
from numpy's seeded generator, so the same --seed gives the same model in every layout (and, with the default shape, the same
model as before the shape options existed). Tensor-parallel tests use the shape options: ranks
split attention by KV heads, so N ranks need --kv-heads >= N.
Needs only numpy and sentencepiece (Debian: python3-numpy, python3-sentencepiece).
"""
import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np
import sentencepiece as spm

# Default shape; every one can be overridden on the command line.
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 160
VOCAB = 400
MAX_POS = 256

TOKENIZER_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing  ",
    "numbers 12345 and 2026",
    "caf\u00e9 na\u00efve \u00fcber \u2713 \u65e5\u672c\u8a9e \U0001f600",
    "line one\nline two\ttab",
    "",
]


def training_text(rng):
    words = ("the of and to in is that for it as was with be by on not he this are or his from "
             "at which but have an they you were her she there one all we their been has when who "
             "will more no if out so said what up its about into than them can only other new "
             "some could time these two may then do first any my now such like our over man me "
             "even most made after also did many before must through back years where much your "
             "way well down should because each just those people how too little state good very "
             "make world still own see men work long get here between both life being under never "
             "day same another know while last might us great old year off come since against go "
             "came right used take three model layer tensor weight rank memory token cache parity "
             "snapshot stream shard gradient optimizer attention caf\u00e9 na\u00efve \u00fcber "
             "stra\u00dfe se\u00f1or").split()
    lines = []
    for _ in range(1500):
        n = int(rng.integers(4, 14))
        line = " ".join(words[int(i)] for i in rng.integers(0, len(words), n))
        if rng.random() < 0.3:
            line += " " + str(int(rng.integers(0, 100000)))
        lines.append(line.capitalize() + ".")
    return "\n".join(lines) + "\n"


def train_tokenizer(out_dir, rng):
    text_path = os.path.join(out_dir, "tokenizer_train.txt")
    with open(text_path, "w", encoding="utf-8") as f:
        f.write(training_text(rng))
    prefix = os.path.join(out_dir, "tokenizer")
    # Llama's own settings, scaled down.
    spm.SentencePieceTrainer.train(
        input=text_path, model_prefix=prefix, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    os.remove(prefix + ".vocab")
    os.remove(text_path)
    return prefix + ".model"


def to_bf16_bits(a):
    """float32 -> bf16 bit patterns, round to nearest even (no NaNs occur here)."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_bits_to_f32(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def make_tensors(rng, vocab, tied, shape):
    hidden, heads, kv_heads, inter = (shape["hidden"], shape["heads"], shape["kv_heads"],
                                      shape["intermediate"])
    head_dim = hidden // heads
    t = {}

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)

    t["model.embed_tokens.weight"] = w(vocab, hidden)
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm()
        t[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        t[p + "post_attention_layernorm.weight"] = norm()
        t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        t[p + "mlp.up_proj.weight"] = w(inter, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, inter)
    t["model.norm.weight"] = norm()
    lm_head = w(vocab, hidden)  # drawn either way, so tied and untied share every other tensor
    if not tied:
        t["lm_head.weight"] = lm_head
    return t


def write_safetensors(path, tensors, metadata):
    """tensors: list of (name, safetensors dtype, numpy array already in that dtype)."""
    header = {"__metadata__": metadata}
    offset = 0
    for name, dtype, arr in tensors:
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, arr in tensors:
            f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shards", type=int, default=1, choices=[1, 2])
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--tokenizer", help="reuse this tokenizer.model instead of training one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--heads", type=int, default=HEADS)
    ap.add_argument("--kv-heads", type=int, default=KV_HEADS)
    ap.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    ap.add_argument("--sliding-window", type=int, default=0,
                    help="write a Mistral-style config with this sliding_window (0: Llama)")
    args = ap.parse_args()
    if min(args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate) <= 0:
        ap.error("--hidden, --layers, --heads, --kv-heads and --intermediate must be positive")
    if args.hidden % args.heads or args.heads % args.kv_heads or (args.hidden // args.heads) % 2:
        ap.error("need --hidden divisible by --heads into an even head size (RoPE rotates pairs) "
                 "and --heads divisible by --kv-heads")
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
             "kv_heads": args.kv_heads, "intermediate": args.intermediate}

    os.makedirs(args.out, exist_ok=True)
    tok_path = os.path.join(args.out, "tokenizer.model")
    if args.tokenizer:
        shutil.copyfile(args.tokenizer, tok_path)
    else:
        trained = train_tokenizer(args.out, np.random.default_rng(1000 + args.seed))
        if os.path.abspath(trained) != os.path.abspath(tok_path):
            os.replace(trained, tok_path)
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    vocab = sp.get_piece_size()

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": MAX_POS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": bool(args.tied),
        "torch_dtype": "bfloat16" if args.dtype == "bf16" else "float32",
        "bos_token_id": sp.bos_id(),
        "eos_token_id": sp.eos_id(),
        "rope_scaling": None,
    }
    if args.sliding_window > 0:
        config.update({"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                       "sliding_window": args.sliding_window})
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    tensors = make_tensors(np.random.default_rng(args.seed), vocab, args.tied, shape)
    checksums = {}
    entries = []
    for name, arr in tensors.items():
        if args.dtype == "bf16":
            stored, st_dtype = to_bf16_bits(arr), "BF16"
            values = bf16_bits_to_f32(stored)
        else:
            stored, st_dtype, values = arr, "F32", arr
        flat = values.reshape(-1).astype(np.float64)
        checksums[name] = {"dtype": st_dtype, "shape": list(arr.shape), "sum": float(flat.sum()),
                           "abs_sum": float(np.abs(flat).sum()),
                           "first": [float(x) for x in flat[:4]]}
        entries.append((name, st_dtype, stored))
    # Reverse order in the file, so a reader cannot get away with assuming layout order.
    entries.reverse()

    meta = {"format": "pt"}
    if args.shards == 1:
        write_safetensors(os.path.join(args.out, "model.safetensors"), entries, meta)
    else:
        half = len(entries) // 2
        parts = [entries[:half], entries[half:]]
        weight_map = {}
        total = 0
        for k, part in enumerate(parts):
            fname = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
            write_safetensors(os.path.join(args.out, fname), part, meta)
            for name, _, arr in part:
                weight_map[name] = fname
                total += arr.nbytes
        with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    with open(os.path.join(args.out, "checksums.json"), "w") as f:
        json.dump(checksums, f, indent=1)
    expected = []
    for s in TOKENIZER_STRINGS:
        ids = sp.encode(s)
        expected.append({"text": s, "ids": ids, "decoded": sp.decode(ids),
                         "pieces": [sp.id_to_piece(i) for i in ids]})
    with open(os.path.join(args.out, "tokenizer_expected.json"), "w") as f:
        json.dump({"bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "vocab_size": vocab,
                   "cases": expected}, f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
