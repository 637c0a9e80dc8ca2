#!/usr/bin/env bash
# End to end through the command line: strata shard + mpirun strata infer on 1 and 2 ranks;
# the 2-rank logits (every prompt and generated position) must equal the 1-rank ones, greedy
# tokens must be identical, and a shard folder for the wrong rank count must fail, not hang.
#   infer_cli_test.sh STRATA_BINARY SOURCE_DIR
set -euo pipefail
STRATA="$1"; SRC="$2"
WORK="$(mktemp -d /tmp/strata-infer-cli-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
MPIRUN=(mpirun --oversubscribe)

/usr/bin/python3 "$SRC/tests/reference/make_tiny_llama.py" --out "$WORK/model" > /dev/null
"$STRATA" shard --model "$WORK/model" --ranks 1 --out "$WORK/s1" 2> /dev/null
"$STRATA" shard --model "$WORK/model" --ranks 2 --dtype f32 --out "$WORK/s2" 2> /dev/null
for n in 1 2; do
  "${MPIRUN[@]}" -np $n "$STRATA" infer --shards "$WORK/s$n" --prompt "Once upon a time" \
    --max-tokens 16 --greedy --json --dump-logits "$WORK/l$n.f32" > "$WORK/out$n.json"
done
/usr/bin/python3 - "$WORK" <<'PY'
import json, sys
import numpy as np
w = sys.argv[1]
a = np.fromfile(f"{w}/l1.f32", "<f4"); b = np.fromfile(f"{w}/l2.f32", "<f4")
assert a.shape == b.shape and a.size > 0, (a.shape, b.shape)
err = float(np.abs(a - b).max() / np.abs(a).max())
assert err <= 1e-5, f"2-rank logits differ from 1-rank: {err}"
s1 = json.load(open(f"{w}/l1.f32.json")); s2 = json.load(open(f"{w}/l2.f32.json"))
assert s1["tokens"] == s2["tokens"], "greedy tokens differ"
assert s1["shape"][0] * s1["shape"][1] == a.size
o = json.load(open(f"{w}/out2.json"))
for key in ("text", "tokens", "ttft_ms", "decode_tokens_per_s", "peak_rss_bytes", "weight_wait_ms"):
    assert key in o, key
assert len(o["peak_rss_bytes"]) == 2 and o["tokens"] > 0
print(f"infer_cli_test: 1 vs 2 ranks rel err {err:.2e}, {o['tokens']} tokens identical")
PY
# --probe-bandwidth (resident): one probe pass per decode step on every rank, reported per rank,
# and the generated text is that of the run without it.
"${MPIRUN[@]}" -np 2 "$STRATA" infer --shards "$WORK/s2" --prompt "Once upon a time" \
  --max-tokens 16 --greedy --window 0 --probe-bandwidth --json > "$WORK/probe.json"
/usr/bin/python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
o = json.load(open(f"{w}/out2.json")); p = json.load(open(f"{w}/probe.json"))
assert p["text"] == o["text"], (p["text"], o["text"])
# One pass per decode step; a run that stops at --max-tokens skips the last token's forward (its
# sample would be thrown away), one that stops at EOS does not.
assert p["probe_passes"] == p["decode_steps"], (p["probe_passes"], p["decode_steps"])
assert p["decode_steps"] == (p["tokens"] - 1 if p["tokens"] == 16 else p["tokens"]), p
# --dump-logits keeps that forward: the logits of every position.
assert o["decode_steps"] == o["tokens"], (o["decode_steps"], o["tokens"])
assert len(p["probe_gbps"]) == 2 and all(g > 0 for g in p["probe_gbps"]), p["probe_gbps"]
tw = p["probe_gbps_time_weighted"]
assert len(tw) == 2 and all(g > 0 for g in tw), tw
assert len(p["huge_mapped_fraction"]) == 2, p
assert all(0 <= f <= 1 for f in p["huge_mapped_fraction"]), p["huge_mapped_fraction"]
assert "probe_gbps" not in o and "probe_gbps_time_weighted" not in o
assert "huge_mapped_fraction" not in o
print(f"infer_cli_test: probe {p['probe_gbps']} GB/s, huge-mapped {p['huge_mapped_fraction']}")
PY
# expect_error PATTERN ARGS...: a 1-rank `strata infer ARGS` exits non-zero within the time
# limit (a refusal, not a hang) and its stderr holds PATTERN.
expect_error() {
  local pattern="$1"; shift
  if timeout 60 "${MPIRUN[@]}" -np 1 "$STRATA" infer "$@" > /dev/null 2> "$WORK/err.txt"; then
    echo "infer_cli_test: accepted: $*"; exit 1
  fi
  grep -q -- "$pattern" "$WORK/err.txt" || { cat "$WORK/err.txt"; exit 1; }
}
# Shards for 2 ranks launched on 1.
expect_error "shard the model for 1 ranks" --shards "$WORK/s2" --prompt x --max-tokens 1
# --context: the KV cache length. Prompt + --max-tokens beyond it is refused up front (naming
# the flag); a context beyond max_position_embeddings is refused; one that fits runs the same
# tokens as the default context.
expect_error "exceeds the context of 8 tokens (--context raises it" --shards "$WORK/s1" \
  --prompt "Once upon a time" --max-tokens 16 --context 8
expect_error "outside what this model allows" --shards "$WORK/s1" --prompt x --max-tokens 1 \
  --context 1000000
"${MPIRUN[@]}" -np 1 "$STRATA" infer --shards "$WORK/s1" --prompt "Once upon a time" \
  --max-tokens 16 --greedy --json --context 40 > "$WORK/ctx.json"
/usr/bin/python3 -c 'import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
assert a["text"] == b["text"], (a["text"], b["text"])
assert a["context"] == 256 and b["context"] == 40, (a["context"], b["context"])' "$WORK/out1.json" "$WORK/ctx.json"
echo "infer_cli_test: passed"
