#!/usr/bin/env bash
# The two-GPU measurements of docs/benchmarks.md (two H200s of one host), one part per call, each under
# 10 minutes (then `python -m pytest -m gpu tests/` on one H200). Run from the repository root on the GPU
# machine, after the wheel preamble of ../shared/device/stage.sh, with Shakespeare staged (stage.sh
# ../shared/data/tinyshakespeare). The `final` part's fused-vs-separate comparison needs the tree before
# 8e40c4c in .abtest: git archive 8e40c4c~1 pufferfish scripts/bench_throughput.py | tar -x -C .abtest
# (then carry .abtest). Parts, with what docs/benchmarks.md quotes from them:
# Time budget, plan check, throughput (2026-11-29):
#   bash scripts/gpu2_measurements.sh budget OUT   # GPU 0: a real 0.1 h run; GPU 1: speed check grid, throughput
#   bash scripts/gpu2_measurements.sh plans OUT    # every profile x mode plan, 20 steps under its emulated cap
#   bash scripts/gpu2_measurements.sh final OUT    # DDP scaling, the plans that ran out of memory, fused vs separate
#                                                  # projections (the pre-fusion tree unpacked in .abtest), FSDP2
# DDP loss curves, the check3 grid, kernel profile, graph-break fix (2026-11-29):
#   bash scripts/gpu2_measurements.sh ddp OUT      # scaling of the current model, the all-reduce probe, and the
#                                                  # loss curves in bf16 (with a rounding control) and in fp32
#   bash scripts/gpu2_measurements.sh grid OUT     # GPU 0 alone, one after the other (the host not shared): the
#                                                  # held-out check3 grid, then 124M throughput with CUDA graphs,
#                                                  # transformers in the same process, GPU time by kernel family
#   bash scripts/gpu2_measurements.sh plans3 OUT   # where the compiled 124M step's host time goes (GPU 0 alone),
#                                                  # then every profile x mode plan under the refitted memory model
#   bash scripts/gpu2_measurements.sh fixed OUT    # after the graph-break fix: no break on the GPU (test), 124M
#                                                  # throughput against transformers (GPU 0) beside check3 again
#                                                  # (GPU 1), then DDP scaling on both
#   bash scripts/gpu2_measurements.sh ddp2 OUT     # compiled DDP: one graph per gradient bucket (torch's default)
#                                                  # against one graph (optimizations.ddp_graphs=whole)
# Compiled DDP graphs, compiled memory rows, FSDP2 memory (2026-11-30):
#   bash scripts/gpu2_measurements.sh ddp3 OUT     # compiled DDP scaling, split against whole (runs one and many
#                                                  # only), with dynamo's recompiles and graph breaks counted
#   bash scripts/gpu2_measurements.sh compiled OUT # every grid's compiled rows again after the graph-break fix
#                                                  # (memory: the model's compiled constants are refitted on fit,
#                                                  # check, check2 and checked on check3), then the peak memory per
#                                                  # GPU of one ~0.7B model under DDP and under FSDP2
#   bash scripts/gpu2_measurements.sh ddp4 OUT     # compiled DDP scaling again with DDP around the compiled step
#                                                  # (StepLoss), whole and split; the chunked-loss rows of every grid
#                                                  # with the chunked loss now kept out of the compiled graph
#   bash scripts/gpu2_measurements.sh plans4 OUT   # every profile x mode plan after the refit; the GPU tests
#                                                  # (a cold machine: give it 8 minutes, PLAN_MINUTES=8)
#   bash scripts/gpu2_measurements.sh gap OUT      # one shape (12 x 512 at 512 x 512, as quick_dev plans it) measured
#                                                  # by pufferfish.lab.calibrate's step and by pufferfish.train (no evaluation;
#                                                  # then accumulation 2): do runs keep more than the grids' steps?
# Plan check of the current memory model, DDP profile, time budget (2026-11-30):
#   bash scripts/gpu2_measurements.sh plans5a OUT  # every plan of the large profiles (h200 ... rtx4090), 8.3 minutes
#   bash scripts/gpu2_measurements.sh plans5b OUT  # every plan of the small profiles (gtx1650 ... rtx4060), 7.2
#                                                  # minutes, then the GPU tests
#   bash scripts/gpu2_measurements.sh ddp5 OUT     # the `gap` part, then compiled DDP scaling beside two one-GPU
#                                                  # runs at once (the host's ceiling), each profiled for 3 steps
#   bash scripts/gpu2_measurements.sh plans6 OUT   # every profile x mode plan after expandable segments and the
#                                                  # finer micro-batch rounding (8 minutes)
#   bash scripts/gpu2_measurements.sh ddp6 OUT     # ddp5's scaling at micro-batch 64 (one step = one micro-batch):
#                                                  # is the 16-sequence step's scaling a host limit?
#   bash scripts/gpu2_measurements.sh budget5 OUT  # a real 0.03 h run on one GPU, checked by pufferfish.lab.budget_check
set -uo pipefail
part=$1 out=$2
export PUFFERFISH_CACHE=$PWD/.pfcache PUFFERFISH_SHARED_DATA=$PWD/.devcarry PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
quiet() { grep -v -i -E "warn|^\s*$" ; }
summary() {  # LABEL RUN_DIR: a pufferfish.train run's peak memory (rank 0) against its plan's, and its speed
  python -c "import json, sys; s = json.load(open(sys.argv[2] + '/summary.json')); print(sys.argv[1], 'params', s['params'], 'peak GiB', round(s['peak_mem_bytes'] / 2**30, 2), 'predicted', round(s['predicted_peak_bytes'] / 2**30, 2), 'tokens/s', round(s['tokens_per_s']))" "$1" "$2" || tail -5 "$2.log"
}
plan_check() {  # MINUTES [check_plans args]: every chosen profile x mode plan on both GPUs, its table, no run dirs
  python -m pufferfish.lab.check_plans --gpus 2 --jobs-per-gpu 6 --max-minutes "$1" "${@:2}" --out "$out/check_plans" 2>&1 | tail -3
  cut -d'|' -f2-5,9-13,15,17 "$out/check_plans/check_plans.md"
  rm -rf "$out"/check_plans/*/
}
ddp_profiled() {  # NAME [bench_ddp args]: compiled DDP scaling beside two runs apart, 3 steps of each profiled
  rm -rf /tmp/bench_ddp_*
  timeout 330 python -m pufferfish.lab.bench_ddp --gpus 2 --steps 50 --no-probe --scaling-only --apart "${@:2}" \
    --out "$out/$1.json" train.profile_steps=3 train.profile_start=21 > "$out/$1.log" 2>&1
  grep -E "^\| " "$out/$1.log"
  mkdir -p "$out/profiles"
  for f in /tmp/bench_ddp_*/*/profile_rank*.txt /tmp/bench_ddp_*/*/*/profile_rank*.txt; do
    [ -f "$f" ] && cp "$f" "$out/profiles/$(basename "$(dirname "$f")")_$(basename "$f")"
  done
  head -2 "$out"/profiles/*.txt
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"
if [ "$part" = budget ]; then
  run=$out/budget_run
  CUDA_VISIBLE_DEVICES=0 python -m pufferfish.train gpu=h200 mode=quick_dev mode.target_hours=0.1 \
    train.progress=false run_dir="$run" hydra.run.dir="$run" > "$out/budget_run.log" 2>&1 &
  budget_pid=$!
  CUDA_VISIBLE_DEVICES=1 timeout 200 python -m pufferfish.lab.calibrate --grid check2 --out "$out/check2.json" 2>&1 | quiet | tail -32
  CUDA_VISIBLE_DEVICES=1 timeout 200 python -m pufferfish.lab.bench_throughput --out "$out/bench124.json" 2>&1 | quiet | tail -13
  CUDA_VISIBLE_DEVICES=1 timeout 100 python -m pufferfish.lab.bench_throughput --shape 350m --no-peer \
    --only "bf16+fused+compile(step)" "bf16+fused+compile(step)+cudnn-attention" --out "$out/bench350.json" 2>&1 | quiet | tail -4
  wait $budget_pid
  tail -4 "$out/budget_run.log"
  python -m pufferfish.lab.budget_check "$run" | tail -3
  rm -rf "$run/checkpoints"
elif [ "$part" = plans ]; then
  python -m pufferfish.lab.check_plans --gpus 2 --jobs-per-gpu 6 --max-minutes 8.3 --out "$out/check_plans" 2>&1 | tail -50
elif [ "$part" = ddp ]; then
  timeout 320 python -m pufferfish.lab.bench_ddp --gpus 2 --accum 4 --steps 60 --out "$out/ddp_bf16.json" 2>&1 | quiet | tail -16
  timeout 170 python -m pufferfish.lab.bench_ddp --gpus 2 --accum 4 --steps 30 --no-probe --out "$out/ddp_fp32.json" \
    optimizations.precision=fp32 optimizations.compile=false 2>&1 | quiet | tail -10
elif [ "$part" = grid ]; then
  export CUDA_VISIBLE_DEVICES=0
  timeout 290 python -m pufferfish.lab.calibrate --grid check3 --out "$out/check3.json" 2>&1 | quiet | tail -24
  timeout 250 python -m pufferfish.lab.bench_throughput --profile --out "$out/bench124.json" \
    --only "bf16+fused+compile(step)" "bf16+fused+compile(step, CUDA graphs)" 2>&1 | quiet | tail -24
elif [ "$part" = plans3 ]; then
  CUDA_VISIBLE_DEVICES=0 TORCH_LOGS=graph_breaks,recompiles timeout 110 python -m pufferfish.lab.bench_throughput --no-peer \
    --profile --only "bf16+fused+compile(step)" "bf16+fused+compile(step, CUDA graphs)" --out "$out/diag124.json" 2>&1 \
    | grep -E "^#|^\||cudagraph|Graph break|graph_break|Recompil" | grep -v "^# *$" | cut -c1-220 | head -80
  plan_check 6.2
elif [ "$part" = fixed ]; then
  timeout 60 python -m pytest -m gpu tests/test_model.py -q -k one_graph 2>&1 | tail -2
  CUDA_VISIBLE_DEVICES=1 timeout 200 python -m pufferfish.lab.calibrate --grid check3 --out "$out/check3_fixed.json" > "$out/check3.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0 timeout 150 python -m pufferfish.lab.bench_throughput --profile --only "bf16+fused+compile(step)" \
    --out "$out/bench124_fixed.json" 2>&1 | grep -E "^\||^# (NVIDIA|host|torch.compile)" | cut -c1-400
  wait
  quiet < "$out/check3.log" | grep -E "^\| |median" | tail -22
  timeout 240 python -m pufferfish.lab.bench_ddp --gpus 2 --accum 4 --steps 60 --no-probe --out "$out/ddp_fixed.json" 2>&1 | quiet | tail -9
elif [ "$part" = ddp2 ]; then
  timeout 280 python -m pufferfish.lab.bench_ddp --gpus 2 --accum 4 --steps 60 --no-probe --out "$out/ddp_split.json" 2>&1 | quiet | tail -9
  timeout 280 python -m pufferfish.lab.bench_ddp --gpus 2 --accum 4 --steps 60 --no-probe --out "$out/ddp_whole.json" \
    optimizations.ddp_graphs=whole 2>&1 | quiet | tail -9
elif [ "$part" = ddp3 ]; then
  for graphs in split whole; do
    TORCH_LOGS=recompiles,graph_breaks timeout 270 python -m pufferfish.lab.bench_ddp --gpus 2 --accum 4 --steps 60 --no-probe \
      --scaling-only --out "$out/ddp_$graphs.json" optimizations.ddp_graphs=$graphs > "$out/ddp_$graphs.log" 2>&1
    echo "$graphs: $(grep -c 'Recompiling' "$out/ddp_$graphs.log") recompile lines, $(grep -ci 'graph break' "$out/ddp_$graphs.log") graph-break lines"
    grep -E "^\| " "$out/ddp_$graphs.log"
  done
elif [ "$part" = ddp4 ]; then
  for graphs in whole split; do
    TORCH_LOGS=graph_breaks timeout 150 python -m pufferfish.lab.bench_ddp --gpus 2 --accum 4 --steps 60 --no-probe \
      --scaling-only --out "$out/ddp4_$graphs.json" optimizations.ddp_graphs=$graphs > "$out/ddp4_$graphs.log" 2>&1
    echo "$graphs: $(grep -ci 'graph break' "$out/ddp4_$graphs.log") graph-break lines"
    grep -E "^\| [0-9]" "$out/ddp4_$graphs.log"
  done
  chunked() { for g in "$@"; do timeout 200 python -m pufferfish.lab.calibrate --grid "$g" --only chunked --out "$out/${g}_chunked.json" 2>&1 \
    | grep -E "^\| [0-9]" | sed "s/^/$g /"; done; }
  CUDA_VISIBLE_DEVICES=0 chunked fit check > "$out/chunked_a.log" &
  CUDA_VISIBLE_DEVICES=1 chunked check2 check3 > "$out/chunked_b.log" &
  wait
  cat "$out"/chunked_?.log
elif [ "$part" = gap ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 200 python -m pufferfish.lab.calibrate --shape 12x512:512x512:all:8192 --out "$out/gap_calibrate.json" \
    2>&1 | grep -E "^\| [0-9]" | sed "s/^/calibrate.py step: /" &
  for accum in 1 2; do  # accumulation 2: the gradients exist during the second micro-batch's forward
    r=$out/gap_train_a$accum
    CUDA_VISIBLE_DEVICES=1 timeout 150 python -m pufferfish.train gpu=auto mode=quick_dev model.num_layers=12 \
      model.num_dims=512 model.seq_len=512 train.micro_batch=512 train.batch_tokens=$((262144 * accum)) \
      train.max_steps=4 train.eval_interval=1000 train.sample_tokens=0 train.progress=false run_dir="$r" \
      hydra.run.dir="$r" > "$r.log" 2>&1
    summary "pufferfish.train, accumulation $accum:" "$r"
    rm -rf "$r/checkpoints"
  done
  wait
elif [ "$part" = compiled ]; then
  grids() { for g in "$@"; do timeout 330 python -m pufferfish.lab.calibrate --grid "$g" --only compiled --out "$out/${g}_compiled.json" 2>&1 \
    | grep -E "^\| [0-9]" | sed "s/^/$g /"; done; }
  CUDA_VISIBLE_DEVICES=0 grids fit check > "$out/grids_a.log" &
  CUDA_VISIBLE_DEVICES=0 grids check2 > "$out/grids_b.log" &
  CUDA_VISIBLE_DEVICES=1 grids check3 > "$out/grids_c.log" &
  wait
  cat "$out"/grids_?.log
  for parallel in ddp fsdp2; do  # the same ~0.7B model, eager bf16, micro-batch 4 x 1024 on each of 2 GPUs
    r=$out/mem_$parallel
    timeout 120 python -m torch.distributed.run --standalone --nproc_per_node=2 -m pufferfish.train gpu=auto \
      mode=quick_dev model.num_layers=24 model.num_dims=1536 model.seq_len=1024 train.micro_batch=4 \
      train.batch_tokens=8192 train.max_steps=10 train.log_interval=5 train.sample_tokens=0 train.progress=false \
      optimizations.compile=false train.parallel=$parallel run_dir="$r" hydra.run.dir="$r" > "$r.log" 2>&1
    summary "$parallel (rank 0):" "$r"
    rm -rf "$r/checkpoints"
  done
elif [ "$part" = plans4 ]; then
  plan_check "${PLAN_MINUTES:-5.3}"
  timeout 75 python -m pytest -m gpu tests/ -q 2>&1 | tail -3
elif [ "$part" = plans5a ] || [ "$part" = plans5b ]; then
  if [ "$part" = plans5a ]; then profiles=h200,h100,a100_80gb,a100_40gb,rtx3090,rtx4090 minutes=8.3
  else profiles=gtx1650,gtx1060,rtx2060,rtx3060,rtx4060 minutes=7.2; fi
  plan_check $minutes --profiles $profiles
  if [ "$part" = plans5b ]; then timeout 75 python -m pytest -m gpu tests/ -q 2>&1 | tail -3; fi
elif [ "$part" = plans6 ]; then
  plan_check "${PLAN_MINUTES:-8}"
elif [ "$part" = ddp6 ]; then
  ddp_profiled ddp6 --micro 64 --accum 1
elif [ "$part" = budget5 ]; then
  run=$out/budget_run
  timeout 210 python -m pufferfish.train gpu=h200 mode=quick_dev mode.target_hours=0.03 train.progress=false \
    train.sample_tokens=0 run_dir="$run" hydra.run.dir="$run" > "$out/budget_run.log" 2>&1
  tail -3 "$out/budget_run.log"
  python -m pufferfish.lab.budget_check "$run" | tail -3
  rm -rf "$run/checkpoints" "$run/tokenizer.model"
elif [ "$part" = ddp5 ]; then
  bash "$0" gap "$out" | grep -v -E "^NVIDIA|^torch "
  ddp_profiled ddp5 --accum 4
  (cd "$out" && tar czf /tmp/results.tgz . && find . -mindepth 1 -delete && mv /tmp/results.tgz .)
elif [ "$part" = final ]; then
  timeout 200 python -m pufferfish.lab.bench_ddp --gpus 2 --accum 4 --out "$out/ddp.json" 2>&1 | quiet | tail -8
  timeout 175 python -m pufferfish.lab.check_plans --profiles h200,h100,a100_80gb,rtx3090,rtx4090,a100_40gb --modes standard \
    --gpus 2 --jobs-per-gpu 3 --max-minutes 2.7 --out "$out/check_plans" 2>&1 | tail -2
  cut -d'|' -f2-5,9-13,15,17 "$out/check_plans/check_plans.md"
  ab() {  # old tree on GPU $1, new on GPU $2, one shape
    CUDA_VISIBLE_DEVICES=$1 timeout 65 python .abtest/scripts/bench_throughput.py --shape "$3" --no-peer \
      --only "bf16+fused+compile(step)" --out "$out/ab_separate_$3.json" > "$out/ab_separate_$3.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=$2 timeout 65 python -m pufferfish.lab.bench_throughput --shape "$3" --no-peer \
      --only "bf16+fused+compile(step)" --out "$out/ab_fused_$3.json" > "$out/ab_fused_$3.log" 2>&1
    wait
    grep -h "^| pufferfish" "$out/ab_separate_$3.log" | sed "s/^/separate $3 GPU$1 /"
    grep -h "^| pufferfish" "$out/ab_fused_$3.log" | sed "s/^/fused $3 GPU$2 /"
  }
  ab 0 1 124m
  ab 1 0 350m
  f=$out/fsdp2
  timeout 70 python -m torch.distributed.run --standalone --nproc_per_node=2 -m pufferfish.train gpu=auto mode=quick_dev \
    model.num_layers=12 model.num_dims=768 model.seq_len=512 train.micro_batch=16 train.batch_tokens=32768 \
    train.max_steps=40 train.log_interval=10 train.sample_tokens=0 train.progress=false train.parallel=fsdp2 \
    run_dir="$f" hydra.run.dir="$f" > "$out/fsdp2.log" 2>&1; echo "fsdp2 exit $?"
  grep -h '"kind": "train"' "$f/metrics.jsonl" | python -c "import sys, json; [print('fsdp2', r['step'], round(r['train_loss'], 3), round(r['tokens_per_s'])) for r in map(json.loads, sys.stdin)]"
  rm -rf "$f/checkpoints" "$out"/check_plans/*/checkpoints
  (cd "$out" && tar czf results.tgz --exclude=results.tgz . && find . -mindepth 1 -maxdepth 1 ! -name results.tgz -exec rm -rf {} +)
fi
