#!/usr/bin/env bash
# One-GPU measurements of docs/benchmarks.md (H200), in two parts of under 10 minutes each.
# Run from the repository root on the GPU machine, after the wheel preamble of ../shared/device/stage.sh,
# with the Shakespeare corpus staged: bash ../shared/device/stage.sh ../shared/data/tinyshakespeare
#   bash scripts/gpu_measurements.sh 1 OUT_DIR   # reliability on the GPU, MoE vs dense, the speed table
#   bash scripts/gpu_measurements.sh 2 OUT_DIR   # the memory tables under 6 GB emulation, the model check
set -uo pipefail
part=$1 out=$2
export PUFFERFISH_SHARED_DATA=$PWD/.devcarry PYTHONUNBUFFERED=1
quiet() { grep -v -i -E "warn|^\s*$" ; }
if [ "$part" = 1 ]; then
  python -m pytest -m gpu tests/test_reliability.py -q -p no:cacheprovider 2>&1 | tail -5
  python -m pufferfish.lab.bench_moe --seconds 30 --out "$out/moe.json" 2>&1 | quiet | tail -5
  python -m pufferfish.lab.measure -m experiment=speed_table hydra.sweep.dir=multirun/speed_table > "$out/speed_sweep.log" 2>&1
  python -m pufferfish.lab.speed_table multirun/speed_table --out "$out" 2>&1 | tail -15
else
  python -m pufferfish.lab.measure -m experiment=memory_table hydra.sweep.dir=multirun/memory_table > "$out/memory_sweep.log" 2>&1
  python -m pufferfish.lab.memory_table multirun/memory_table --search-max-layers --minutes 2.5 --out "$out" 2>&1 | tail -30
  timeout 170 python -m pufferfish.lab.calibrate --grid check --out "$out/check.json" 2>&1 | quiet | tail -40
fi
