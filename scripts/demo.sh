#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, builds strata, then
#  1. trains a small Llama (about 4M parameters) from scratch on 2 ranks (data parallel) on the
#     fortune cookies of Debian's `fortunes` package, with a SentencePiece tokenizer trained here
#     by spm_train (no downloads), and saves it as a Hugging Face folder;
#  2. shards the trained model for 2 ranks and generates text on 2 ranks with tensor parallelism;
#  3. runs the allreduce benchmark (star, ring, tree and Open MPI's own MPI_Allreduce over the
#     mpi and tcp transports) on 4 ranks of this host and prints its table.
#   scripts/demo.sh [extra `strata bench allreduce` options]
# Environment: STRATA_DEMO_STEPS (training steps, default 400), STRATA_DEMO_RANKS (allreduce, 4).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/common.sh"

"$ROOT/scripts/install-deps.sh"
BUILD="${STRATA_BUILD_DIR:-$ROOT/build}"
echo "demo.sh: building in $BUILD"
strata_build "$BUILD" strata
STRATA="$BUILD/launcher/strata"

WORK="$BUILD/demo"
rm -rf "$WORK"
mkdir -p "$WORK"
FORTUNES=/usr/share/games/fortunes
cat "$FORTUNES"/{fortunes,wisdom,people,literature,humorists,computers,science,work,linux,law,food,education,platitudes,pets,magic,love,kids,medicine,miscellaneous,politics,definitions} \
  > "$WORK/fortunes.txt"
echo "demo.sh: corpus $WORK/fortunes.txt ($(wc -c < "$WORK/fortunes.txt") bytes of fortune cookies)"
echo "demo.sh: training a SentencePiece tokenizer with spm_train"
grep -v '^%$' "$WORK/fortunes.txt" > "$WORK/spm-input.txt"
spm_train --input="$WORK/spm-input.txt" --model_prefix="$WORK/fortunes-sp" --vocab_size=2000 \
  --model_type=bpe --byte_fallback=true --character_coverage=1.0 --unk_id=0 --bos_id=1 \
  --eos_id=2 --pad_id=-1 --num_threads=2 --minloglevel=2 > "$WORK/spm_train.log" 2>&1
cat > "$WORK/model-config.json" <<'EOF'
{"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
 "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256}
EOF
STEPS="${STRATA_DEMO_STEPS:-400}"
echo "demo.sh: mpirun -np 2 strata train ($STEPS steps, 2 data-parallel ranks)"
mpirun -np 2 --oversubscribe "$STRATA" train --config "$WORK/model-config.json" \
  --tokenizer "$WORK/fortunes-sp.model" --data "$WORK/fortunes.txt" --steps "$STEPS" \
  --batch 16 --seq 128 --lr 6e-3 --warmup 30 --save "$WORK/trained" --json > "$WORK/train.jsonl"
/usr/bin/python3 - "$WORK/train.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"demo.sh: loss {rows[0]['loss']:.3f} at step 1 -> {rows[-1]['loss']:.3f} at step {rows[-1]['step']}")
PY
"$STRATA" shard --model "$WORK/trained" --ranks 2 --out "$WORK/shards-2"
for prompt in "A day for" "The computer" "Love is"; do
  echo "demo.sh: mpirun -np 2 strata infer --prompt \"$prompt\" (tensor-parallel, star allreduce)"
  mpirun -np 2 --oversubscribe "$STRATA" infer --shards "$WORK/shards-2" \
    --prompt "$prompt" --max-tokens 48 --temperature 0.7 --top-p 0.9 --seed 1
  echo
done

RANKS="${STRATA_DEMO_RANKS:-4}"
OUT="$BUILD/allreduce-demo.json"
echo "demo.sh: mpirun -np $RANKS strata bench allreduce (results also in $OUT)"
mpirun -np "$RANKS" --oversubscribe "$STRATA" bench allreduce \
  --algorithms star,ring,tree,native --transport mpi,tcp --sizes 8,4096,65536,1048576 \
  --iters 100 --warmup 10 --out "$OUT" "$@"
