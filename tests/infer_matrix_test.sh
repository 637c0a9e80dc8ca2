#!/usr/bin/env bash
# The tensor-parallel matrix end to end through the command line, on a tiny Llama with 8 heads,
# 4 KV heads and an intermediate size of 200 (not a multiple of the 32-column FFN unit, so the
# last rank's FFN slice is ragged):
#   - strata shard + mpirun strata infer on N = 1, 2, 3, 4 ranks, equal and uneven --ratios, the
#     star, ring and tree allreduces, mpi and tcp transports: every position's logits (prompt and
#     32 greedy steps) match the 1-rank run of the same weight dtype (f32; bf16 once) to a
#     relative error of 1e-5, and the greedy tokens are identical;
#   - the 1-rank greedy tokens equal PyTorch's (tests/reference/llama_ref.py --generate 32, which
#     re-runs the full forward on the growing sequence, no KV cache), the prompt ids equal
#     python-sentencepiece's, and the 1-rank logits match PyTorch's to 1e-4.
# With a third argument W > 0 the model is Mistral-style with sliding_window W and a prompt
# longer than W, so both the prefill and the decode attend through the window; fewer rank cases
# run, and PyTorch's logits without the window must differ (the window is really exercised).
#   infer_matrix_test.sh STRATA_BINARY SOURCE_DIR [SLIDING_WINDOW]
set -euo pipefail
STRATA="$1"; SRC="$2"; SW="${3:-0}"
WORK="$(mktemp -d /tmp/strata-infer-matrix-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PY=/usr/bin/python3
PROMPT="Hello world"  # greedy output of this model: 25 distinct tokens in 32, no eos
STEPS=32
MODEL_ARGS=(--heads 8 --kv-heads 4 --intermediate 200)
if (( SW > 0 )); then
  PROMPT="Hello world, hello world, hello world"  # 22 tokens; 32 greedy steps, no eos
  MODEL_ARGS+=(--sliding-window "$SW")
fi

"$PY" "$SRC/tests/reference/make_tiny_llama.py" --out "$WORK/model" "${MODEL_ARGS[@]}" > /dev/null

# The torch side: prompt ids from python-sentencepiece (BOS first, as strata encodes), then greedy
# decoding in PyTorch.
IDS="$("$PY" -c 'import sys, sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
print(",".join(str(i) for i in [sp.bos_id()] + sp.encode(sys.argv[2])))' \
  "$WORK/model/tokenizer.model" "$PROMPT")"
"$PY" "$SRC/tests/reference/llama_ref.py" --model "$WORK/model" --tokens "$IDS" \
  --generate $STEPS --out "$WORK/torch.json" --logits-out "$WORK/torch.f32"

# ranks:ratios:allreduce:dtype:transport ("-" = equal split); the first case of each dtype is
# its 1-rank baseline. Uneven splits: 2 ranks 3,1 -> kv heads 3+1; 3 ranks 2,1,1 -> 2+1+1,
# 1,3,1 -> 1+2+1 and 1,1,2 -> 1+1+2; 4 ranks 1,2,3,4 -> FFN 32+32+64+72 columns.
CASES=(1:-:star:f32:mpi 2:-:star:f32:mpi 2:3,1:ring:f32:mpi 3:-:star:f32:mpi
       3:2,1,1:ring:f32:mpi 3:1,3,1:star:f32:tcp 3:1,1,2:tree:f32:mpi 4:-:star:f32:mpi
       4:1,2,3,4:tree:f32:mpi 4:-:ring:f32:tcp 1:-:star:bf16:mpi 4:1,2,3,4:ring:bf16:mpi)
if (( SW > 0 )); then
  CASES=(1:-:star:f32:mpi 2:-:star:f32:mpi 3:1,1,2:tree:f32:mpi)
  # The same weights without the window: PyTorch's logits of the same sequence must differ.
  mkdir "$WORK/nowindow"
  ln -s "$WORK/model/"*.safetensors "$WORK/model/tokenizer.model" "$WORK/nowindow/"
  "$PY" -c 'import json, sys
c = json.load(open(sys.argv[1])); del c["sliding_window"]; json.dump(c, open(sys.argv[2], "w"))' \
    "$WORK/model/config.json" "$WORK/nowindow/config.json"
  "$PY" -c 'import json, sys; d = json.load(open(sys.argv[1]))
print(",".join(str(t) for t in d["prompt"] + d["tokens"]))' "$WORK/torch.json" > "$WORK/seq.txt"
  "$PY" "$SRC/tests/reference/llama_ref.py" --model "$WORK/nowindow" --tokens "$(cat "$WORK/seq.txt")" \
    --out "$WORK/torch_nowindow.f32"
fi
for c in "${CASES[@]}"; do
  IFS=: read -r n ratios algo dtype transport <<< "$c"
  tag="${c//[:,]/_}"
  extra=()
  [[ "$ratios" != "-" ]] && extra=(--ratios "$ratios")
  "$STRATA" shard --model "$WORK/model" --ranks "$n" "${extra[@]}" --dtype "$dtype" \
    --out "$WORK/s$tag" 2> "$WORK/plan$tag.txt"
  timeout 120 mpirun --oversubscribe -np "$n" "$STRATA" infer --shards "$WORK/s$tag" \
    --prompt "$PROMPT" --max-tokens $STEPS --greedy --json --allreduce "$algo" \
    --transport "$transport" --dump-logits "$WORK/l$tag.f32" > "$WORK/out$tag.json"
done

"$PY" - "$WORK" "$IDS" $STEPS "$SW" "${CASES[@]}" <<'PY'
import json, re, sys
import numpy as np
w, steps, sw, cases = sys.argv[1], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
ids = [int(t) for t in sys.argv[2].split(",")]
tag = lambda c: c.replace(":", "_").replace(",", "_")

def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())

torch = json.load(open(f"{w}/torch.json"))
assert len(torch["tokens"]) == steps, f"torch stopped early (eos) after {len(torch['tokens'])}"
t_logits = np.fromfile(f"{w}/torch.f32", "<f4")
base = tag(cases[0])
b_logits = np.fromfile(f"{w}/l{base}.f32", "<f4")
b_side = json.load(open(f"{w}/l{base}.f32.json"))
vocab = b_side["shape"][1]
assert b_side["tokens"][:len(ids)] == ids, ("prompt ids differ from sentencepiece's",
                                            b_side["tokens"][:len(ids)], ids)
got = b_side["tokens"][len(ids):]
if got != torch["tokens"]:
    want = torch["tokens"]
    k = next((i for i in range(len(want)) if i >= len(got) or got[i] != want[i]), len(want))
    sys.exit(f"greedy tokens differ from PyTorch at step {k}: strata {got} torch {torch['tokens']} "
             f"(torch's smallest top-2 margin {torch['min_margin']:.2e})")
assert b_logits.size == t_logits.size == (len(ids) + steps) * vocab, (b_logits.size, t_logits.size)
err_torch = rel(b_logits, t_logits)
assert err_torch <= 1e-4, f"1-rank logits differ from PyTorch: rel err {err_torch:.2e}"
print(f"infer_matrix_test: 1 rank = PyTorch: {steps} greedy tokens identical, logits rel err "
      f"{err_torch:.2e} (smallest top-2 margin {torch['min_margin']:.2e}, "
      f"max abs diff {float(np.abs(b_logits - t_logits).max()):.2e})")
if sw > 0:
    assert len(ids) > sw, f"the prompt ({len(ids)} tokens) must be longer than the window {sw}"
    full = np.fromfile(f"{w}/torch_nowindow.f32", "<f4").reshape(-1, vocab)
    t2 = t_logits.reshape(-1, vocab)
    assert rel(t2[:sw], full[:sw]) <= 1e-6, "before the window fills, the window changes nothing"
    err_full = rel(t2[sw:], full[sw:])
    assert err_full > 1e-2, f"the window changed the logits by only {err_full:.2e}"
    print(f"infer_matrix_test: sliding window {sw} over a {len(ids)}-token prompt: logits differ "
          f"from full causal attention by {err_full:.2e} after position {sw}")

# Each uneven case must really be uneven: kv heads per rank from the plan strata shard printed.
want_kv = {"2:3,1": [3, 1], "3:2,1,1": [2, 1, 1], "3:1,3,1": [1, 2, 1], "3:1,1,2": [1, 1, 2],
           "4:1,2,3,4": [1, 1, 1, 1]}
baselines = {}
for c in cases:
    n, ratios, algo, dtype, transport = c.split(":")
    t = tag(c)
    if dtype not in baselines:
        assert n == "1", c
        baselines[dtype] = (np.fromfile(f"{w}/l{t}.f32", "<f4"),
                            json.load(open(f"{w}/l{t}.f32.json")))
        continue
    b_logits, b_side = baselines[dtype]
    plan = open(f"{w}/plan{t}.txt").read()
    slices = [(int(a), int(b), int(f0), int(f1)) for a, b, f0, f1 in re.findall(
        r"kv heads \[(\d+), (\d+)\).*ffn \[(\d+), (\d+)\)", plan)]
    assert len(slices) == int(n), plan
    kv = [b - a for a, b, _, _ in slices]
    ffn = [f1 - f0 for _, _, f0, f1 in slices]
    if f"{n}:{ratios}" in want_kv:
        assert kv == want_kv[f"{n}:{ratios}"], (c, kv)
    assert sum(kv) == 4 and sum(ffn) == 200, (c, kv, ffn)
    logits = np.fromfile(f"{w}/l{t}.f32", "<f4")
    side = json.load(open(f"{w}/l{t}.f32.json"))
    assert logits.shape == b_logits.shape, (c, logits.shape, b_logits.shape)
    err = rel(logits, b_logits)
    assert err <= 1e-5, f"{c}: logits differ from 1 rank: rel err {err:.2e}"
    assert side["tokens"] == b_side["tokens"], f"{c}: greedy tokens differ from 1 rank"
    out = json.load(open(f"{w}/out{t}.json"))
    assert out["ranks"] == int(n) and out["tokens"] == steps and out["allreduce"] == algo, out
    assert out["transport"] == transport, out
    print(f"infer_matrix_test: {dtype} {n} rank(s) ratios {ratios} {algo} {transport}: kv heads "
          f"{kv}, ffn {ffn}, rel err vs 1 rank {err:.2e}, tokens identical")
# bf16 weights are a different model from f32: only check that it ran the full 32 steps.
if sw == 0:
    assert "bf16" in baselines and len(baselines["bf16"][1]["tokens"]) == len(ids) + steps
PY
echo "infer_matrix_test: passed"
