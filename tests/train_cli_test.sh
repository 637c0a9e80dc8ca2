#!/usr/bin/env bash
# strata train end to end through the command line:
#  - the same run twice gives byte-identical losses (determinism);
#  - 2 ranks (mpirun) and 1 rank with the same global batch agree within float tolerance;
#  - the saved model is a Hugging Face folder that strata shard + strata infer run on 2 ranks;
#  - --dump-grads writes safetensors; bad input fails clearly before any work.
#   train_cli_test.sh STRATA_BINARY SOURCE_DIR
set -euo pipefail
STRATA="$1"; SRC="$2"
WORK="$(mktemp -d /tmp/strata-train-cli-XXXXXX)"
RUN="cli$$"
trap 'rm -rf "$WORK" /tmp/strata-snapshotd-"$RUN".*' EXIT
MPIRUN=(mpirun --oversubscribe)
PY=/usr/bin/python3

$PY "$SRC/tests/reference/make_tiny_llama.py" --out "$WORK/model" > /dev/null
# Any English text will do as a corpus; the tokenizer is the tiny model's own.
for i in 1 2 3 4 5 6; do cat "$SRC/README.md"; echo; done > "$WORK/corpus.txt"
ARGS=(--model "$WORK/model" --data "$WORK/corpus.txt" --steps 4 --batch 4 --seq 32 --lr 3e-3
      --warmup 1 --json --threads 1 --run "$RUN")

"$STRATA" train "${ARGS[@]}" > "$WORK/a.jsonl" 2> "$WORK/a.err"
"$STRATA" train "${ARGS[@]}" --dump-grads "$WORK/g1.safetensors" --memory-report \
  --save "$WORK/trained" > "$WORK/b.jsonl" 2> "$WORK/b.err"
"${MPIRUN[@]}" -np 2 "$STRATA" train "${ARGS[@]}" > "$WORK/c.jsonl" 2> "$WORK/c.err"
grep -q "memory report" "$WORK/b.err" || { cat "$WORK/b.err"; exit 1; }
# Without clipping AdamW runs per layer during the backward (on 2 ranks after each layer's
# all-reduce, with a snapshot fenced before each step's first update): bit for bit the losses of
# the same run updating after the backward.
"${MPIRUN[@]}" -np 2 "$STRATA" train "${ARGS[@]}" --clip 0 \
  > "$WORK/ov.jsonl" 2> "$WORK/ov.err"
"${MPIRUN[@]}" -np 2 "$STRATA" train "${ARGS[@]}" --clip 0 --no-optimizer-overlap \
  --snapshot-every 0 > "$WORK/noov.jsonl" 2> "$WORK/noov.err"
grep -q "overlapped with the rest of the backward" "$WORK/ov.err" || { cat "$WORK/ov.err"; exit 1; }
grep -q "runs after the backward (--no-optimizer-overlap)" "$WORK/noov.err" || { cat "$WORK/noov.err"; exit 1; }
grep -q "runs after the backward (--clip needs" "$WORK/a.err" || { cat "$WORK/a.err"; exit 1; }

$PY - "$WORK" <<'PY'
import json, struct, sys
w = sys.argv[1]
def losses(name):
    rows = [json.loads(l) for l in open(f"{w}/{name}.jsonl") if l.strip()]
    for r in rows:
        for k in ("step", "loss", "tokens_per_s", "peak_rss_bytes"):
            assert k in r, (name, k, r)
    return rows
a, b, c = losses("a"), losses("b"), losses("c")
ov, noov = losses("ov"), losses("noov")
assert [r["loss"] for r in ov] == [r["loss"] for r in noov], "overlapped AdamW changed the losses"
assert [r["loss"] for r in ov] != [r["loss"] for r in c], "--clip 0 should differ from clipping"
assert len(a) == len(b) == len(c) == 4, (len(a), len(b), len(c))
# Determinism: JSON carries the double's shortest round-trip repr, so equal text = equal bits.
assert [r["loss"] for r in a] == [r["loss"] for r in b], "two identical runs differ"
for x, y in zip(a, c):
    rel = abs(x["loss"] - y["loss"]) / abs(x["loss"])
    assert rel < 1e-5, f"1 rank vs 2 ranks: step {x['step']} {x['loss']} vs {y['loss']}"
assert len(c[0]["peak_rss_bytes"]) == 2
assert a[-1]["loss"] < a[0]["loss"], "the loss did not fall"
with open(f"{w}/g1.safetensors", "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
assert "model.embed_tokens.weight" in header and "lm_head.weight" in header
print(f"train_cli_test: losses {[round(r['loss'], 4) for r in a]}, 2-rank max rel diff ok")
PY

# The trained folder loads in the inference path.
"$STRATA" shard --model "$WORK/trained" --ranks 2 --out "$WORK/shards" 2> /dev/null
"${MPIRUN[@]}" -np 2 "$STRATA" infer --shards "$WORK/shards" --prompt "strata" --max-tokens 8 \
  --greedy --json > "$WORK/infer.json"
grep -q '"tokens"' "$WORK/infer.json"

# Bad input: clear messages, non-zero exits, nothing written.
expect_fail() {  # expect_fail PATTERN ARGS...
  local pattern="$1"; shift
  if "$STRATA" train "$@" > /dev/null 2> "$WORK/err.txt"; then
    echo "train_cli_test: accepted bad input: $*"; exit 1
  fi
  grep -q "$pattern" "$WORK/err.txt" || { echo "expected '$pattern' in:"; cat "$WORK/err.txt"; exit 1; }
}
: > "$WORK/empty.txt"
expect_fail "holds no text" --model "$WORK/model" --data "$WORK/empty.txt" --save "$WORK/never"
expect_fail "longer than the model allows" --model "$WORK/model" --data "$WORK/corpus.txt" \
  --seq 100000
cat > "$WORK/huge.json" <<'EOF'
{"hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 64,
 "num_attention_heads": 128, "max_position_embeddings": 256}
EOF
expect_fail "needs" --config "$WORK/huge.json" --tokenizer "$WORK/model/tokenizer.model" \
  --data "$WORK/corpus.txt" --save "$WORK/never"
expect_fail "exactly one of" --data "$WORK/corpus.txt"
expect_fail "device must be cpu, cuda or cuda:N" "${ARGS[@]}" --device gpu --save "$WORK/never"
# --device cuda without a GPU (or without a CUDA build) says so and trains nothing; with a GPU it
# must train, with losses close to the CPU's (PyTorch-free check: the first loss is the same model
# on the same batch).
if "$STRATA" train "${ARGS[@]}" --device cuda > "$WORK/cuda.jsonl" 2> "$WORK/cuda.err"; then
  $PY - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
cpu = [json.loads(l)["loss"] for l in open(f"{w}/a.jsonl") if l.strip()]
gpu = [json.loads(l)["loss"] for l in open(f"{w}/cuda.jsonl") if l.strip()]
assert len(gpu) == len(cpu), (cpu, gpu)
for c, g in zip(cpu, gpu):
    assert abs(c - g) <= 1e-3 * abs(c), (cpu, gpu)
PY
else
  grep -Eq "no usable CUDA device|built without CUDA|CUDA device [0-9]+ asked for|CUDA plugin" "$WORK/cuda.err" \
    || { echo "unclear --device cuda failure:"; cat "$WORK/cuda.err"; exit 1; }
fi
test ! -e "$WORK/never"
echo "train_cli_test: passed"
