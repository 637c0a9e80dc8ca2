#!/usr/bin/env bash
# Memory grows with parameters, not with depth x activations (issue #4): trains the 200M shape of
# train_bench.sh at batch 4 x 2048 tokens, where a plain autograd loop (bench/torch_train.py: the
# same Llama, every activation kept for backward) would need more than this machine's 24 GiB
# just for saved activations. Prints strata's memory report, peak RSS and tokens/s, and the
# autograd activation estimate for the same shapes, counted tensor by tensor from
# torch_train.py's forward (what its backward keeps alive), next to the RAM of this machine.
#   bench/train_big.sh STRATA_BINARY [OUT.json]
# Environment: BATCH (4), SEQ (2048), STEPS (2), THREADS (2), MICRO (batch: sequences per pass).
set -euo pipefail
STRATA="$1"; OUT="${2:-/tmp/train_big.json}"
BATCH="${BATCH:-4}"; SEQ="${SEQ:-2048}"; STEPS="${STEPS:-2}"; THREADS="${THREADS:-2}"
MICRO="${MICRO:-$BATCH}"
WORK="$(mktemp -d /tmp/strata-train-big-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
VOCAB=8192
cat > "$WORK/cfg.json" <<EOF
{"hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 16, "num_attention_heads": 16,
 "num_key_value_heads": 8, "max_position_embeddings": 4096, "vocab_size": $VOCAB}
EOF
/usr/bin/python3 -c "
import numpy as np
np.random.default_rng(0).integers(0, $VOCAB, 1_000_000, dtype=np.int32).astype('<i4').tofile('$WORK/tokens.i32')"
"$STRATA" train --config "$WORK/cfg.json" --data "$WORK/tokens.i32" --steps "$STEPS" \
  --batch "$BATCH" --micro-batch "$MICRO" --seq "$SEQ" --threads "$THREADS" --warmup 1 --json \
  --snapshot-every 0 --memory-report > "$WORK/run.jsonl" 2> "$WORK/run.err" \
  || { cat "$WORK/run.err" >&2; exit 1; }
/usr/bin/python3 - "$WORK" "$OUT" "$BATCH" "$SEQ" "$VOCAB" <<'PY'
import json, re, sys
w, out, B, T, V = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
cfg = json.load(open(f"{w}/cfg.json"))
d, f, L, h, kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads"))
kvd = kv * d // h
N = B * T
# Saved for backward per layer by torch_train.py's forward (f32 floats): two RMSNorms keep their
# input and normalized x (2 x 2 N d) and their output (2 N d, the matmuls' input); q, k, v and
# the rotated halves (2 N d + 4 N kvd); the repeated k, v (2 N d); the softmax output (B h T^2);
# the attention output before o_proj (N d); the residual stream (N d); gate, silu(gate), up and
# their product (4 N f). Transients (scores before softmax, backward buffers) come on top.
per_layer = 4 * N * d + 2 * N * d + 2 * N * d + 4 * N * kvd + 2 * N * d + B * h * T * T + \
            N * d + N * d + 4 * N * f
logits = 2 * N * V  # logits and softmax of the LM head
autograd = 4 * (L * per_layer + logits)
rows = [json.loads(l) for l in open(f"{w}/run.jsonl") if l.strip()]
err = open(f"{w}/run.err").read()
params = int(re.search(r"strata train: (\d+) parameters", err).group(1))
units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
rep = {m.group(1).strip(): float(m.group(2)) * units[m.group(3)]
       for m in re.finditer(r"^\s+([a-zA-Z() /f0-9]+?)\s+([\d.]+) (\w+)$", err, re.M)}
mem = open("/proc/meminfo").read()
ram = int(re.search(r"MemTotal:\s+(\d+) kB", mem).group(1)) * 1024
res = {"params": params, "batch": B, "seq": T, "tokens_per_s": rows[-1]["tokens_per_s"],
       "step_s": rows[-1]["step_s"], "peak_rss_bytes": max(rows[-1]["peak_rss_bytes"]),
       "memory_report": rep, "autograd_saved_activations_bytes": autograd, "ram_bytes": ram}
open(out, "w").write(json.dumps(res) + "\n")
gib = 1 << 30
print(f"- model: {params / 1e6:.1f}M parameters, {L} layers, batch {B} x {T} tokens")
for k, v in rep.items():
    print(f"  - {k}: {v / gib:.2f} GiB")
print(f"- strata peak RSS: {res['peak_rss_bytes'] / gib:.2f} GiB "
      f"({res['peak_rss_bytes'] / rep.get('total', float('nan')):.2f} x the report's total); "
      f"{res['tokens_per_s']:.0f} tokens/s, {res['step_s']:.1f} s per step")
print(f"- activations an autograd loop keeps for the same step (counted): {autograd / gib:.1f} GiB; "
      f"RAM of this machine: {ram / gib:.1f} GiB")
PY
