#!/usr/bin/env bash
# Muon against AdamW by the passes a run makes over its data: where does optim.name=auto's line lie?
# The same model (4 x 128, a 2,048-piece tokenizer) trained for the same seconds on Shakespeare corpora of 1, 2, 3,
# 10 and all 39 training plays (alphabetical; hamlet, tempest and sonnets are the validation text of every run),
# so that the same seconds read each corpus about 13, 6, 4, 1.2 and 0.3 times. Each optimizer is named outright.
#   bash scripts/optimizer_passes.sh OUT [BUDGET_S] [GPU]    # default 60 s on the CPU: about 12 minutes
#   REPORT=1 bash scripts/optimizer_passes.sh OUT             # the table again, from OUT's runs
# Writes OUT/passes.jsonl (one row a run: plays, unique tokens, the passes its plan made (its planned training
# tokens over the corpus's), best evaluation, handed-over loss)
# and prints the table. Needs ../shared/data/shakespeare_complete (the benchmark corpora; not in the repository).
set -euo pipefail
out=$1 budget=${2:-60} gpu=${3:-cpu}
plays=$(cd "$(dirname "$0")/.." && pwd)/../shared/data/shakespeare_complete
mkdir -p "$out"
if [ -z "${REPORT:-}" ]; then
  [ -d "$plays" ] || { echo "no $plays: this benchmark reads the Shakespeare plays of ../shared/data" >&2; exit 2; }
  rm -rf "$out/val" && mkdir -p "$out/val"
  cp "$plays"/hamlet_gut.txt "$plays"/tempest_gut.txt "$plays"/sonnets_gut.txt "$out/val/"
  for n in 1 2 3 10 39; do
    rm -rf "$out/plays_$n" "$out/ttl_$n" && mkdir -p "$out/plays_$n"
    ls "$plays" | grep -v -E '^(hamlet|tempest|sonnets)_gut.txt$' | sort | head -"$n" | while read -r f; do
      cp "$plays/$f" "$out/plays_$n/"; done
    python -m pufferfish.lab.time_to_loss --out "$out/ttl_$n" --target 9.0 --corpus "$out/plays_$n" --budget "$budget" \
      --sizes 4x128 --systems muon,adamw --gpu "$gpu" --set "data.val_paths=['$out/val']" data.vocab_size=2048 \
      2>&1 | grep -v -i warn | tail -3
  done
fi
python - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for ttl in sorted(out.glob("ttl_*"), key=lambda p: int(p.name.split("_")[1])):
    for line in (ttl / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        plan = json.loads((Path(r["run_dir"]) / "plan.json").read_text())
        best = min(r["curve"], key=lambda e: e[1])
        rows.append({"plays": int(ttl.name.split("_")[1]), "optimizer": r["system"], "unique_tokens": plan["corpus_tokens"],
                     "planned_passes": round(plan["train_tokens"] / plan["corpus_tokens"], 2), "steps": r["steps"], "batch_tokens": r["batch_tokens"],
                     "best_eval": round(best[1], 4), "best_step": best[2], "handed_over": round(r["val_loss"], 4),
                     "stopped_by": r["stopped_by"], "budget_s": r["budget_s"]})
(out / "passes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
print("| plays | unique tokens | optimizer | planned passes | steps | best evaluation (step) | handed-over loss | ended by |")
print("|---|---|---|---|---|---|---|---|")
for r in sorted(rows, key=lambda r: (-r["unique_tokens"], r["optimizer"] != "muon")):
    print(f"| {r['plays']} | {r['unique_tokens']:,} | {r['optimizer']} | {r['planned_passes']} | {r['steps']} | "
          f"{r['best_eval']:.3f} ({r['best_step']}) | {r['handed_over']:.3f} | {r['stopped_by']} |")
EOF
