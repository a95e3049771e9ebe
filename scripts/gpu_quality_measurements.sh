#!/usr/bin/env bash
# One-GPU (H200) measurements of quality and time to loss for docs/benchmarks.md, each part under 10 minutes,
# in the order that matters most when GPU time is short. Run from the repository root on the GPU machine, after
# the wheel preamble of ../shared/device/stage.sh, with the Shakespeare corpus and nanoGPT staged:
#   bash ../shared/device/stage.sh ../shared/data/shakespeare_complete ../shared/peers/nanogpt
#   bash scripts/gpu_quality_measurements.sh PART OUT_DIR
# Parts:
#   step       throughput of the 124M shape through the training step (step.py), against transformers
#              (the product's technique only; `python -m pufferfish.lab.bench_throughput` runs all of them)
#   plans      every gpu profile x mode plan, 20 steps under its card's memory cap on its card's path; on one
#              GPU over 8 minutes, so PROFILES=h200 apart from PROFILES=gtx1060,...,h100 (comma-separated)
#   plan-default, plan-shakespeare        the plan's handed-over loss at 108 s and 180 s on that corpus
#                                         (BUDGETS=108 or BUDGETS=180 for one of them)
#   nanogpt-default, nanogpt-shakespeare  nanoGPT's recipe on the same tokens and wall-clock time
#   oracle-default, oracle-shakespeare    the one-multirun oracle at 108 s: 20 jobs, over 40 minutes, so run it
#                                         in parts of one width each: WIDTHS=0.5, then 0.75, 1, 1.5 and 2
#   ttl-default, ttl-shakespeare          seconds to the default recipe's best loss at 60 s, two sizes: the default,
#                                         each candidate and nanoGPT (SYSTEMS=default,adamw,... for some of them)
#   ttl-peer-default, ttl-peer-shakespeare  seconds the default plan takes to reach nanoGPT's final loss of a
#                                         10-minute run, nanoGPT's own recipe (GPT-2 124M) on the same tokens. In
#                                         two parts: SYSTEMS=nanogpt PEER_SECONDS=600 (about 12 minutes with its
#                                         probe, so DETACH=1), then SYSTEMS=default BUDGET=300 (the default recipe
#                                         planned for half that time; TARGET=default to run it before nanoGPT's).
#                                         With neither set: the default planned for 600 s, then nanoGPT as long
#                                         (over 20 minutes)
#   ttl-batch-default, ttl-batch-shakespeare  the default recipe (SYSTEMS=default,adamw,... for others) planned
#                                         for BUDGET s (300) at each batch of BATCHES (tokens a step, comma-separated;
#                                         default 65536,131072), each into OUT_DIR/ttl_batch_CORPUS_B, against
#                                         nanoGPT's final loss (SEED its rows)
# SEED=FILE,... (e.g. docs/measurements/2026-12-06/time_to_loss_h100_default_nanogpt.jsonl) copies earlier runs'
# rows into a time-to-loss part's results where it has none yet: a fresh machine then reads the default corpus at
# their cap (the same text, where the machine's Python source is the same) and takes their targets.
# GPU=h100 (any gpu profile) plans for that card instead of the H200 (the profile must match the card the
# part runs on: its speed and memory are what the plans assume).
# DETACH=1 runs the part in the background, detached from the terminal (setsid), so it goes on after the shell
# that started it exits; it logs to OUT_DIR/PART.log: follow the part there. Its process id is in
# OUT_DIR/running.pid (`while kill -0 $(cat OUT_DIR/running.pid); do sleep 15; done` waits for it), and no other
# part starts into OUT_DIR while it runs: two parts on one GPU would time each other.
# Each quality part appends to OUT_DIR/results.jsonl; `python -m pufferfish.lab.quality_per_budget --out
# OUT_DIR --report` then prints the table from every part run so far.
set -uo pipefail
part=$1 out=$2
mkdir -p "$out"
if [ -z "${DETACHED_PART:-}" ] && [ -s "$out/running.pid" ] && kill -0 "$(cat "$out/running.pid")" 2>/dev/null; then
  echo "a detached part is still running into $out (pid $(cat "$out/running.pid")); wait for it: two parts on one" \
    "GPU would time each other" >&2
  exit 1
fi
if [ "${DETACH:-}" = 1 ]; then
  DETACH= DETACHED_PART=1 setsid nohup bash "$0" "$part" "$out" > "$out/$part.log" 2>&1 < /dev/null &
  echo $! > "$out/running.pid"
  echo "detached: $part logs to $out/$part.log"
  exit 0
fi
export PUFFERFISH_SHARED_DATA=$PWD/.devcarry PUFFERFISH_NANOGPT=$PWD/.devcarry/nanogpt PYTHONUNBUFFERED=1
quiet() { grep -v -i -E "warn|^\s*$" ; }
corpus=${part#*-} gpu=${GPU:-h200}
seed() {  # SEED's rows into $1/results.jsonl, unless it has rows already
  mkdir -p "$1"
  if [ -n "${SEED:-}" ] && [ ! -s "$1/results.jsonl" ]; then
    tr ',' '\n' <<< "$SEED" | while read -r f; do cat "$f"; done > "$1/results.jsonl" || exit 1
  fi
}
case "$part" in
  step)
    python -m pufferfish.lab.bench_throughput --shape 124m --only "bf16+fused+compile(step)" --out "$out/step.json" 2>&1 | quiet | tail -20 ;;
  plans)
    python -m pufferfish.lab.check_plans --out "$out/check_plans" --max-minutes 8 --jobs-per-gpu 10 \
      ${PROFILES:+--profiles "$PROFILES"} 2>&1 | quiet | tail -60 ;;
  plan-*|nanogpt-*)
    python -m pufferfish.lab.quality_per_budget --out "$out" --corpora "$corpus" --budgets "${BUDGETS:-108,180}" \
      --systems "${part%%-*}" --gpu "$gpu" 2>&1 | quiet | tail -20 ;;
  oracle-*)
    python -m pufferfish.lab.quality_per_budget --out "$out" --corpora "$corpus" --budgets 108 --systems oracle \
      --oracle-widths "${WIDTHS:-0.5,0.75,1,1.5,2}" \
      --gpu "$gpu" 2>&1 | quiet | tail -20 ;;
  ttl-batch-*)
    corpus=${part#ttl-batch-}
    for batch in $(tr ',' ' ' <<< "${BATCHES:-65536,131072}"); do
      seed "$out/ttl_batch_${corpus}_$batch"
      python -m pufferfish.lab.time_to_loss --out "$out/ttl_batch_${corpus}_$batch" --target "${TARGET:-nanogpt}" \
        --corpus "$corpus" --budget "${BUDGET:-300}" --sizes plan --systems "${SYSTEMS:-default}" --set "train.batch_tokens=$batch" \
        --gpu "$gpu" 2>&1 | quiet | tail -8
    done ;;
  ttl-peer-*)
    corpus=${part#ttl-peer-}
    seed "$out/ttl_peer_$corpus"
    python -m pufferfish.lab.time_to_loss --out "$out/ttl_peer_$corpus" --target "${TARGET:-nanogpt}" --corpus "$corpus" \
      --budget "${BUDGET:-600}" --sizes plan --systems "${SYSTEMS:-default,nanogpt}" \
      ${PEER_SECONDS:+--peer-seconds "$PEER_SECONDS"} --gpu "$gpu" 2>&1 | quiet | tail -20 ;;
  ttl-*)
    seed "$out/ttl_$corpus"
    python -m pufferfish.lab.time_to_loss --out "$out/ttl_$corpus" --target default --corpus "$corpus" \
      --budget 60 --sizes 6x384,8x512 ${SYSTEMS:+--systems "$SYSTEMS"} --gpu "$gpu" 2>&1 | quiet | tail -20 ;;
  *) echo "unknown part $part; see the header of $0" >&2; exit 2 ;;
esac
