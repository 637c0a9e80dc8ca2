#!/usr/bin/env bash
# strata train --precision bf16 end to end through the command line:
#  - the loss falls, and the same run twice gives byte-identical losses;
#  - oneDNN's emulation (DNNL_MAX_CPU_ISA=AVX512_CORE: AVX-512 without its BF16 instructions)
#    runs too and says it is emulated;
#  - where oneDNN cannot run bf16 (DNNL_MAX_CPU_ISA=AVX2 stands in for such a CPU), a clear error
#    and a non-zero exit, never a silent f32 run; bad --precision values and bf16 with
#    --stage zero-copy fail clearly.
# Exits 77 (skipped) on a CPU where oneDNN cannot run bf16 at all, after checking that refusal.
#   train_bf16_cli_test.sh STRATA_BINARY SOURCE_DIR
set -euo pipefail
STRATA="$1"; SRC="$2"
WORK="$(mktemp -d /tmp/strata-train-bf16-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PY=/usr/bin/python3

$PY "$SRC/tests/reference/make_tiny_llama.py" --out "$WORK/model" > /dev/null
for i in 1 2 3 4 5 6; do cat "$SRC/README.md"; echo; done > "$WORK/corpus.txt"
ARGS=(--model "$WORK/model" --data "$WORK/corpus.txt" --steps 6 --batch 4 --seq 32 --lr 3e-3
      --warmup 1 --json --threads 2 --snapshot-every 0)
BF16=("${ARGS[@]}" --precision bf16)

"$STRATA" train --help > "$WORK/help.txt"
grep -q -- "--precision" "$WORK/help.txt" || { echo "--help lacks --precision"; exit 1; }

expect_fail() {  # expect_fail PATTERN ARGS...
  local pattern="$1"; shift
  if "$@" > "$WORK/fail.out" 2> "$WORK/fail.err"; then
    echo "expected a failure: $*"; exit 1
  fi
  grep -q -- "$pattern" "$WORK/fail.err" || { echo "no '$pattern' in:"; cat "$WORK/fail.err"; exit 1; }
  [ ! -s "$WORK/fail.out" ] || { echo "a refused run printed steps:"; cat "$WORK/fail.out"; exit 1; }
}
expect_fail "precision must be f32 or bf16" "$STRATA" train "${ARGS[@]}" --precision fp16
# No bf16 in oneDNN (as on a CPU without AVX-512): refused before any step.
expect_fail "bf16 matrix products are not available" env DNNL_MAX_CPU_ISA=AVX2 \
  "$STRATA" train "${BF16[@]}"

if ! "$STRATA" train "${BF16[@]}" > "$WORK/a.jsonl" 2> "$WORK/a.err"; then
  if grep -q "bf16 matrix products are not available" "$WORK/a.err"; then
    echo "skipped: $(grep -o 'bf16 matrix products are not available.*' "$WORK/a.err")"
    exit 77
  fi
  cat "$WORK/a.err"; exit 1
fi
expect_fail "cannot be zero-copy" "$STRATA" train "${BF16[@]}" --stage zero-copy
grep -q "precision bf16" "$WORK/a.err" || { cat "$WORK/a.err"; exit 1; }
"$STRATA" train "${BF16[@]}" > "$WORK/b.jsonl" 2> "$WORK/b.err"
DNNL_MAX_CPU_ISA=AVX512_CORE "$STRATA" train "${BF16[@]}" > "$WORK/e.jsonl" 2> "$WORK/e.err"
grep -q "emulated" "$WORK/e.err" || { echo "no emulation note:"; cat "$WORK/e.err"; exit 1; }
"$STRATA" train "${ARGS[@]}" --precision f32 > "$WORK/f.jsonl" 2> "$WORK/f.err"

$PY - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
def losses(name):
    return [json.loads(l)["loss"] for l in open(f"{w}/{name}.jsonl") if l.strip()]
a, b, e, f = losses("a"), losses("b"), losses("e"), losses("f")
assert len(a) == len(b) == len(e) == len(f) == 6, (len(a), len(b), len(e), len(f))
# JSON carries the double's shortest round-trip repr, so equal text = equal bits.
assert a == b, f"two identical bf16 runs differ: {a} vs {b}"
for name, l in (("bf16", a), ("bf16 emulated", e)):
    assert l[-1] < l[0] - 0.1, f"{name}: the loss did not fall: {l}"
# bf16 follows f32 closely on this tiny model (the per-step bound is in train_bf16_test).
for x, y in zip(a, f):
    assert abs(x - y) < 0.02 * abs(y), f"bf16 {a} strays from f32 {f}"
print(f"train_bf16_cli_test: bf16 {[round(x, 4) for x in a]}, f32 {[round(x, 4) for x in f]}, "
      f"emulated {[round(x, 4) for x in e]}")
PY
