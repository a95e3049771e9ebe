"""python -m pufferfish.train [group=option ...]: plan, train, evaluate, checkpoint and sample.

`train(cfg)` is the one training function; the CLI, the Python API, sweeps and tests all call it. It reads
the plan (resolver/) and runs its step (step.py) until the plan's steps are done, the time budget is spent or
the validation loss stops paying (best.py). The host reads the device only at log intervals and checkpoints.
What goes wrong on the way is handled in place (reliability.py, docs/reliability.md): an out-of-memory retries
the step with half the micro-batch; a failed compilation retries it eager; a NaN/Inf step makes no update,
and a run of them rolls back to the last checkpoint; a preemption signal ends the step, saves and exits for a
requeue. Every change to the plan during the run is a revision the resolver records (resolver/replan.py).
"""

from __future__ import annotations

import json
import os
import sys
import time

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from . import config as _schemas  # noqa: F401  (registers the schemas with Hydra)
from .best import BestModel
from .checkpoint import (
    atomic_write_bytes,
    atomic_write_text,
    load_latest,
    restore_training_state,
    rng_state,
    save_checkpoint,
)
from .console import leaves_no_empty_run_dir, log_console
from .data import prepare_data
from .data.loader import TrainBatches
from .data.tokenizer import Tokenizer
from .distributed import agree_to_stop, barrier, init_world, same_on_all, wrap
from .distributed import close as close_world
from .errors import exit_on_user_error
from .evaluation import Evaluator, write_sample
from .loggers import attach_loggers
from .model import build_model
from .model.moe import moe_metrics
from .optim import build_optimizer
from .paths import CONF_DIR
from .profiling import StepProfiler
from .reliability import (
    NonFiniteGuard,
    StepLedger,
    StopFlag,
    divergence_advice,
    free_memory,
    is_compile_failure,
    is_out_of_memory,
    root_cause,
)
from .resolver import Plan, apply_memory_cap, format_plan, prefer_expandable_segments
from .resolver.hardware import Hardware, detect_hardware
from .resolver.replan import Pace, plan_eager_step, plan_smaller_micro_batch
from .rundir import (
    check_disk_for_checkpoints,
    check_same_run,
    data_config,
    plan_for,
    run_directory,
    save_config,
    write_plan,
)
from .runlog import MetricsLog, git_revision, peak_memory_bytes
from .schedule import lr_at
from .sharding import full_state, unsharded
from .step import StepSpec, TrainStep, use_tf32
from .transforms import apply_speed_transforms
from .validate import validate

STOP_WORDS = {"schedule": "its schedule complete", "train.max_steps": "train.max_steps reached, schedule complete",
              "time budget": "the time budget reached", "stop_at_step": "train.stop_at_step reached",
              "early stop": "early stop: the validation loss stayed above its best"}  # fmt: skip


def _the_plan(cfg, world, run_dir, data, found, hw: Hardware | None) -> Plan:
    """Rank 0 plans (or reuses a resumed run's plan.json) and writes the run directory, then lets the others
    past their barrier (train(), before the data): they read its plan.json."""
    if not world.is_main:
        return Plan.from_dict(json.loads((run_dir / "plan.json").read_text()))
    if found:
        check_same_run(cfg, run_dir)
    plan, _ = plan_for(cfg, run_dir, data, resuming=found is not None, world_size=world.size,
                       checkpoint_model=found[0].get("model_config") if found else None,
                       step=found[0]["step"] if found else 0, hw=hw)  # fmt: skip
    check_disk_for_checkpoints(run_dir, plan.params, cfg.train.keep_checkpoints)
    save_config(cfg, run_dir)
    atomic_write_bytes(run_dir / "tokenizer.model", data.tokenizer_path.read_bytes())  # the run dir stands alone
    print(format_plan(plan) + (f"\n(resuming {found[1].name}: plan reused from plan.json)" if found else ""))
    barrier(world)
    return plan


def _the_device(plan, world) -> str:
    """The plan's device for this rank, set up as the card would be: TF32 or not, an emulated card's memory cap."""
    device = plan.hardware["device"]
    if world.enabled and device.startswith("cuda"):
        device = f"cuda:{world.local_rank}"  # the plan was made on rank 0's GPU; each rank has its own
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        use_tf32(device, plan.tf32)
        if plan.hardware["emulated"]:
            apply_memory_cap(Hardware(**plan.hardware))
    return device


@leaves_no_empty_run_dir
def train(cfg: DictConfig) -> dict:
    validate(cfg)  # every value once, before anything is written or loaded
    prefer_expandable_segments()  # before CUDA starts
    tc = cfg.train
    world, _ = init_world(tc.device)  # torchrun / SLURM: one process per GPU; otherwise a world of one
    run_dir = same_on_all(world, run_directory(cfg))  # rank 0's: Hydra's clock may differ by a second
    ckpt_dir = run_dir / "checkpoints"
    # the hardware, detected once on rank 0 (the others would each touch GPU 0), sizes the default corpus's cap
    # and then the plan: on the CPU, one measurement of its matmul rate for both
    hw = detect_hardware(cfg.gpu, cfg.optimizations, tc.device) if world.is_main else None
    data_cfg = same_on_all(world, data_config(cfg, world.size, hw) if world.is_main else None)
    if not world.is_main:
        barrier(world)  # rank 0 prepares the data cache and the plan first
    data = prepare_data(data_cfg, progress=tc.progress and world.is_main)
    ready = time.perf_counter()  # the budget counts from here: planning, building, the first checkpoint are in it
    found = load_latest(ckpt_dir)
    plan = _the_plan(cfg, world, run_dir, data, found, hw)
    if cfg.dry_run:
        return {"plan": plan.to_dict(), "run_dir": str(run_dir)}

    device = _the_device(plan, world)
    torch.manual_seed(tc.seed)
    model = build_model(plan.model_config(), device)  # the pure model: checkpoints save its state
    sharded = world.enabled and tc.parallel == "fsdp2"  # FSDP2 compiles block by block, before sharding
    applied = apply_speed_transforms(model, plan.grad_ckpt, plan.compile and sharded, device)
    parallel = wrap(model, world, device, tc.parallel, plan.precision)  # DDP or FSDP2 with ranks, else the model
    optimizer = build_optimizer(model, plan.optimizer, plan.lr, plan.fused_adamw)  # after FSDP2
    if world.enabled and not sharded and plan.compile:  # DDP: one graph, or one per gradient bucket
        torch._dynamo.config.optimize_ddp = plan.ddp_graphs == "split"
    train_step = TrainStep(model, optimizer, StepSpec.from_plan(plan), device, parallel, world, sharded)
    if train_step.compiled:
        applied.append(f"torch.compile (forward + loss, {plan.compile_backend})")
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=found[0]["step"] if found else None) if world.is_main \
        else MetricsLog(os.devnull)  # fmt: skip  (rank 0 alone writes the run directory)
    best = BestModel(ckpt_dir, plan.model, plan.early_stop_evals, plan.early_stop_rise)
    evaluator = Evaluator(model, data, plan, train_step.autocast, device, best, log)
    ledger = StepLedger(NonFiniteGuard(tc.max_bad_steps, divergence_advice(plan.lr, plan.grad_clip, plan.precision,
                                                                           ckpt_dir)), log)  # fmt: skip
    step, tokens_seen, elapsed, sample_index = 0, 0, 0.0, 0
    if found:
        state, path = found
        restore_training_state(state, path, model, optimizer, train_step.scaler)
        step, tokens_seen, elapsed, sample_index = state["step"], state["tokens"], state["elapsed_s"], state["sample"]
        ledger.load_state_dict(state)
        evaluator.tokens = state.get("val_tokens", evaluator.tokens)
        if "best" in state:
            best.load_state_dict(state["best"])
    if world.is_main:
        attach_loggers(cfg, log, plan, run_dir)
    if not found:
        log.log({"kind": "start", "step": 0, "git": git_revision(), "transforms": applied, "params": plan.params})

    def train_batches(start_sample: int) -> TrainBatches:  # rank r reads micro-batches r, r+N, ... of one stream
        return TrainBatches(data.train_path, data.dtype, plan.seq_len, plan.micro_batch, tc.seed,
                            fraction=plan.data_fraction, start_sample=start_sample + world.rank * plan.micro_batch,
                            device=device, prefetch=plan.prefetch_batches,
                            stride=world.size * plan.micro_batch)  # fmt: skip

    def save() -> None:  # every rank: FSDP2 gathers the full state dicts onto rank 0
        weights, optimizer_state = full_state(model, optimizer)
        if world.is_main:
            best.save(world.is_main)  # first: the checkpoint's counters name these best weights
            save_checkpoint(ckpt_dir, {
                "model": weights, "optimizer": optimizer_state, "scaler": train_step.scaler.state_dict(),
                "step": step, "tokens": tokens_seen, "elapsed_s": elapsed, "rng": rng_state(),
                "sample": loader.sample - world.rank * plan.micro_batch,  # the stream's position, rank 0's
                "model_config": plan.model, "val_tokens": evaluator.tokens, "best": best.state_dict(),
                **ledger.state_dict()}, step, tc.keep_checkpoints)  # fmt: skip

    loader = train_batches(sample_index)
    pace = Pace(plan, device, world.enabled, bool(tc.max_steps), tc.sample_tokens)
    if not found:  # a first checkpoint now: a disk that cannot hold one fails here, and a rollback has a target
        t = time.perf_counter()
        save()
        pace.save_s = time.perf_counter() - t  # the final one costs about as much
    stop, stopped_by, budget = StopFlag(), "schedule", plan.time_budget_s
    bar = tqdm(total=plan.steps, initial=step, disable=not (tc.progress and world.is_main), desc="train", unit="step",
               dynamic_ncols=True)  # one bar for the run: the other processes train the same steps
    start = (time.perf_counter() if found else ready) - elapsed
    last_ckpt = window_t = time.perf_counter()
    window_tokens = 0
    model.train()
    profiler = StepProfiler(run_dir, world.rank, tc.profile_steps, tc.profile_start, device)
    try:
        while step < plan.steps:
            lr = lr_at(step, plan.steps, plan.lr, **plan.schedule)
            train_step.set_lr(lr)
            if evaluator.due(step):
                evaluator(step, tokens_seen, time.perf_counter() - start)
                pace.overhead_s += evaluator.last_s
                if best.stop(step, plan.steps, loader.epoch) and not world.enabled:  # ranks: rank 0 decides, below
                    stopped_by = "early stop"
                    print(f"\n{best.why_stop(step, time.perf_counter() - start, budget)}", flush=True)
                    break
            step_start, step_t = loader.sample, time.perf_counter()
            while True:
                try:
                    step_loss, grad_norm, ok = train_step(loader.next)
                    break
                except Exception as e:  # out of memory: half the micro-batch; compilation failed: eager
                    if is_out_of_memory(e) and not world.enabled:  # ranks cannot back off one alone
                        revision = plan_smaller_micro_batch(plan, step + 1, (str(e).splitlines() or [""])[0])
                    elif is_compile_failure(e) and train_step.compiled:
                        train_step.to_eager()
                        revision = plan_eager_step(plan, cfg, step + 1, root_cause(e))
                        print(f"pufferfish: {plan.reasons['compile']}; micro-batch {plan.micro_batch}", file=sys.stderr)
                    else:
                        raise
                free_memory(model, optimizer, device)  # out here: the exception no longer holds the step's tensors
                log.log(revision)
                write_plan(run_dir, plan)  # a resumed run keeps the revision
                train_step.follow(plan)
                loader.close()
                loader = train_batches(step_start)  # the same sequences, in the new micro-batches
            ledger.add(step, step_loss, grad_norm, ok)
            step += 1
            tokens_seen += plan.batch_tokens
            window_tokens += plan.batch_tokens
            bar.update(1)
            profiler.step()

            log_now = step % tc.log_interval == 0 or step == plan.steps
            ckpt_due = time.perf_counter() - last_ckpt > tc.ckpt_interval_s
            if world.enabled:  # rank 0's clock, at log intervals: every rank settles, rolls back and saves together
                ckpt_due = log_now and same_on_all(world, ckpt_due)
            rollback = ledger.settle() if log_now or ckpt_due or not train_step.on_device else False
            if log_now:
                now = time.perf_counter()
                train_loss, tps = ledger.window_loss(), window_tokens / max(1e-9, now - window_t)
                window_t, window_tokens = now, 0
                log.log({"kind": "train", "step": step, "train_loss": train_loss, "lr": lr, "tokens_per_s": tps,
                         "tokens": tokens_seen, "elapsed_s": now - start, "grad_norm": ledger.grad_norm,
                         "epoch": loader.epoch, **moe_metrics(model)})  # fmt: skip
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}")
            if rollback:  # the last good weights; the data stream goes on past the offending batches
                state, path = load_latest(ckpt_dir)
                restore_training_state(state, path, model, optimizer, train_step.scaler)
                log.log({"kind": "rollback", "step": state["step"], "from_step": step, "checkpoint": path.name,
                         "skipped_samples": loader.sample - state["sample"]})  # fmt: skip
                step, tokens_seen = state["step"], state["tokens"]
                ledger.load_state_dict(state, rollback=True)
                bar.n = step
            elif ckpt_due and not ledger.guard.in_a_row:  # never mid-streak
                t = time.perf_counter()
                elapsed = t - start
                save()
                last_ckpt = time.perf_counter()
                pace.overhead_s += last_ckpt - t
            elapsed = time.perf_counter() - start
            step_s = pace.step_time(step, time.perf_counter() - step_t)
            revision = world.is_main and pace.replan(step, elapsed, step_s, evaluator.last_s, evaluator.tokens,
                                                     evaluator.final_tokens, may=log_now or not world.enabled)  # fmt: skip
            if revision:  # the steps re-planned from the measured speed
                if revision["data_fraction"] != loader.fraction:  # more steps: drawn from more of the corpus
                    loader.close()
                    loader = train_batches(loader.sample - world.rank * plan.micro_batch)
                train_step.follow(plan)  # a slow step may accumulate fewer micro-batches
                write_plan(run_dir, plan)
                evaluator.tokens = min(evaluator.tokens, plan.eval_tokens)
                bar.total = plan.steps
                bar.refresh()
            why = None
            if world.enabled and best.stop(step, plan.steps, loader.epoch):
                why = best.why_stop(step, elapsed, budget)
            elif stop:
                why = f"signal {stop.signal}"
            elif tc.stop_at_step and step >= tc.stop_at_step:
                why = "stop_at_step"
            elif not tc.max_steps and elapsed + step_s + evaluator.last_s + pace.finish_s(
                    evaluator.last_s, evaluator.tokens, evaluator.final_tokens) > budget:  # max_steps: it reports
                why = "time budget"
            if world.enabled:  # ranks agree at log intervals only: one host sync there, not every step
                if log_now:
                    why, steps, evaluator.tokens = agree_to_stop(world, why, plan.steps, evaluator.tokens)
                    if steps != plan.steps and not world.is_main:  # rank 0 re-planned from its measured speed
                        plan.set_steps(steps)
                        if plan.data_fraction != loader.fraction:  # as rank 0 did: more of the corpus
                            loader.close()
                            loader = train_batches(loader.sample - world.rank * plan.micro_batch)
                else:
                    why = None
            if why:
                stopped_by = "early stop" if why.startswith("stopped early") else why
                if stopped_by == "early stop" and world.is_main:
                    print(f"\n{why}", flush=True)
                break
    finally:  # also on an error: no loader thread, signal handler or profiler outlives the loop
        profiler.stop()
        bar.close()
        loader.close()
        stop.restore()
    ledger.settle()  # the last steps' counts (no rollback now: a skipped step left the weights as they were)
    elapsed = time.perf_counter() - start
    save()
    finished = step >= plan.steps or stopped_by in ("time budget", "early stop")
    result = {"step": step, "tokens": tokens_seen, "elapsed_s": elapsed, "stopped_by": stopped_by,
              "skipped_steps": ledger.skipped, **peak_memory_bytes(device)}  # fmt: skip
    if finished:  # hand over the best weights, unless the last are as good
        result.update(evaluator.hand_over(step, tokens_seen, time.perf_counter() - start, world.is_main))
        log.log({"kind": "eval", "step": step, "tokens": tokens_seen, "final": True, **result})
        sampler = unsharded(model, world, device) if tc.sample_tokens else None  # FSDP2: every rank gathers
        if tc.sample_tokens and world.is_main:
            tokenizer = Tokenizer.load(data.tokenizer_path)
            result["sample"] = write_sample(sampler, tokenizer, cfg.data.prompt, tc.sample_tokens, device, tc.seed,
                                            run_dir / "sample.txt")  # fmt: skip
            print(f"\nSample ({tc.sample_tokens} tokens):\n{result['sample']}\n")
    log.close()  # also finishes the mirrors (one W&B run per job, even in a multirun)
    # wall_s: the loop plus the final checkpoint, evaluation and sample (elapsed_s: the loop alone)
    result.update({"run_dir": str(run_dir), "params": plan.params, "git": git_revision(), "finished": finished,
                   "predicted_peak_bytes": plan.predicted_peak_bytes, "tokens_per_s": tokens_seen / max(1e-9, elapsed),
                   "wall_s": time.perf_counter() - start})  # fmt: skip
    if world.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(result, indent=2))
    close_world(world)
    if world.is_main:
        shown = "train.max_steps" if tc.max_steps and stopped_by == "schedule" else stopped_by
        print(f"{'done' if finished else 'stopped'} ({STOP_WORDS.get(shown, shown)}): step {step}/"
              f"{plan.steps}, {elapsed:.1f} s of a {budget:.0f} s budget, run directory {run_dir}")  # fmt: skip
    pace.threads.restore()
    if stop:
        stop.exit_for_requeue()  # after the checkpoint: a launcher's own handler runs, then exit 144
    return result


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")  # absolute: see __main__ below
@log_console  # outside the next one: train.log gets its one-line error too
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    from pufferfish.overrides import check_command_line

    exit_on_user_error(check_command_line)(sys.argv[1:])  # Hydra's own errors as one line, exit 2
    # the importable module's main, not __main__'s: launchers (submitit) pickle the task function by name
    from pufferfish.train import main as importable_main

    importable_main()
