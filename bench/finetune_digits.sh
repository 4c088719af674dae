#!/usr/bin/env bash
# The README's fine-tuning figures over seeds: for each seed, pre-train on the digits 0-5,
# fine-tune on the digits 6-9 from that run, and train the same 6-9 run from scratch; then print
# each kind's test top-1 per seed and its range. ~25 min on 2 CPU cores for 3 seeds.
#   bash bench/finetune_digits.sh [WORKDIR] [SEED...]      (defaults: /tmp/finetune_digits 0 1 2)
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-/tmp/finetune_digits}"
seeds=("${@:2}")
[ "${#seeds[@]}" -gt 0 ] || seeds=(0 1 2)
mkdir -p "$root"
run() {  # NAME FLAGS...: one train.py run, its output in ROOT/NAME.log (shown if it fails).
  local name="$1"
  shift
  python train.py --workdir="$root/$name" "$@" > "$root/$name.log" 2>&1 \
    || { tail -20 "$root/$name.log"; exit 1; }
}
for seed in "${seeds[@]}"; do
  run "pretrain_$seed" --config=configs/finetune_digits.py:pretrain --config.seed="$seed"
  run "finetune_$seed" --config=configs/finetune_digits.py --config.seed="$seed" \
    --config.init_from="$root/pretrain_$seed"
  run "scratch_$seed" --config=configs/finetune_digits.py --config.seed="$seed"
done
python - "$root" "${seeds[@]}" <<'PY'
import json
import sys

root, seeds = sys.argv[1], sys.argv[2:]
for kind in ('pretrain', 'finetune', 'scratch'):
  top1 = [json.load(open(f'{root}/{kind}_{s}/results.json'))['raw_eval']['test']['top1']
          for s in seeds]
  print(f'{kind:9s} seeds {",".join(seeds)}: ' + ' / '.join(f'{t:.2f}' for t in top1)
        + f'  (range {min(top1):.2f}-{max(top1):.2f}%, mean {sum(top1) / len(top1):.2f}%)')
PY
