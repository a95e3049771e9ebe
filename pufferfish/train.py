"""python -m pufferfish.train [group=option ...]: plan, train, evaluate, checkpoint and sample.

`train(cfg)` is the one training function; the CLI, the Python API, sweeps and tests all call it.
Order of one step: lr -> eval -> micro-steps -> clip -> optimizer step -> log/checkpoint -> stop checks.
The host reads the device only at log intervals and checkpoints: a non-finite step is skipped on the
device (fused AdamW's found_inf) and counted when it is read, so the GPU never waits for the host.
What goes wrong on the way is handled in place (pufferfish/reliability.py, docs/reliability.md): an
out-of-memory retries the step with half the micro-batch; a NaN/Inf step makes no update, and a run of
them rolls back to the last checkpoint; a preemption signal ends the step, saves and exits for a requeue.
"""

from __future__ import annotations

import json
import math
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
from .data.loader import TrainBatches, val_batches
from .data.tokenizer import Tokenizer
from .distributed import agree_to_stop, barrier, gradient_sync, init_world, mean_across, same_on_all, wrap
from .distributed import close as close_world
from .errors import ConfigError, exit_on_user_error
from .loggers import attach_loggers
from .loss import lm_loss
from .model import build_model
from .model.moe import moe_aux_loss, moe_metrics, update_moe_biases
from .optim import build_optimizer
from .paths import CONF_DIR
from .profiling import StepProfiler
from .reliability import (
    NonFiniteGuard,
    PendingSteps,
    back_off,
    divergence_advice,
    finite_on_device,
    free_memory,
    is_compile_failure,
    is_out_of_memory,
    reset_moe_counts,
    root_cause,
    skip_on_device,
)
from .resolver import EVALS_PER_RUN, Plan, apply_memory_cap, format_plan, prefer_expandable_segments
from .resolver.replan import plan_eager_step
from .run import (
    MAX_STEP_SHARE,
    SAMPLE_COST,
    CpuThreads,
    StopFlag,
    check_disk_for_checkpoints,
    check_same_run,
    data_config,
    evaluate,
    plan_for,
    run_directory,
    save_config,
    write_sample,
)
from .runlog import MetricsLog, git_revision, peak_memory_bytes
from .schedule import lr_at
from .sharding import full_state, full_weights, plain, unsharded
from .sharding import grad_scaler as sharded_grad_scaler
from .transforms import apply_speed_transforms, autocast, compile_step, grad_scaler, sdpa_backend
from .validate import validate

CALIBRATE_FROM = 2  # steps before this include compilation and allocator warm-up
STOP_WORDS = {"schedule": "its schedule complete", "train.max_steps": "train.max_steps reached, schedule complete",
              "time budget": "the time budget reached", "stop_at_step": "train.stop_at_step reached",
              "early stop": "early stop: the validation loss stayed above its best"}  # fmt: skip


@leaves_no_empty_run_dir
def train(cfg: DictConfig) -> dict:
    validate(cfg)  # every value once, before anything is written or loaded
    prefer_expandable_segments()  # before CUDA starts
    tc = cfg.train
    world, _ = init_world(tc.device)  # torchrun / SLURM: one process per GPU; otherwise a world of one
    run_dir = same_on_all(world, run_directory(cfg))  # rank 0's: Hydra's clock may differ by a second
    ckpt_dir = run_dir / "checkpoints"
    # the default corpus's cap, decided on rank 0 (the others would each touch GPU 0 to detect the hardware)
    data_cfg = same_on_all(world, data_config(cfg, world.size) if world.is_main else None)
    if not world.is_main:
        barrier(world)  # rank 0 prepares the data cache and the plan first
    data = prepare_data(data_cfg, progress=tc.progress and world.is_main)
    ready = time.perf_counter()  # the budget counts from here: planning, building, the first checkpoint are in it
    found = load_latest(ckpt_dir)
    if world.is_main:
        if found:
            check_same_run(cfg, run_dir)
        plan, reused = plan_for(cfg, run_dir, data, resuming=found is not None, world_size=world.size,
                                checkpoint_model=found[0].get("model_config") if found else None)  # fmt: skip
        check_disk_for_checkpoints(run_dir, plan.params, tc.keep_checkpoints)
        save_config(cfg, run_dir)
        atomic_write_bytes(run_dir / "tokenizer.model", data.tokenizer_path.read_bytes())  # the run dir stands alone
        print(format_plan(plan) + (f"\n(resuming {found[1].name}: plan reused from plan.json)" if found else ""))
        barrier(world)
    else:
        plan = Plan.from_dict(json.loads((run_dir / "plan.json").read_text()))
    if cfg.dry_run:
        return {"plan": plan.to_dict(), "run_dir": str(run_dir)}

    hw = plan.hardware
    device, precision = hw["device"], plan.precision
    if world.enabled and device.startswith("cuda"):
        device = f"cuda:{world.local_rank}"  # the plan was made on rank 0's GPU; each rank has its own
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = plan.tf32  # the card's: an emulated pre-Ampere card has none
        torch.backends.cudnn.allow_tf32 = plan.tf32
        if hw["emulated"]:
            from .resolver.hardware import Hardware

            apply_memory_cap(Hardware(**hw))
    torch.manual_seed(tc.seed)
    model = build_model(plan.model_config(), device)  # the pure model: checkpoints save its state
    sharded = world.enabled and tc.parallel == "fsdp2"  # FSDP2 compiles block by block, before sharding
    applied = apply_speed_transforms(model, plan.grad_ckpt, plan.compile and sharded, device)
    parallel = wrap(model, world, device, tc.parallel, precision)  # DDP or FSDP2 with several ranks, else model
    optimizer = build_optimizer(model, cfg.optim, plan.lr, plan.fused_adamw)  # after FSDP2
    scaler = sharded_grad_scaler(precision, device) if sharded else grad_scaler(precision, device)
    ctx = autocast(precision, device)
    step, tokens_seen, elapsed, sample_index, skipped = 0, 0, 0.0, 0, 0
    val_tokens = min(plan.eval_tokens, data.val_tokens)  # planned: sized to the budget, unless max_steps
    final_tokens = min(plan.final_eval_tokens, data.val_tokens)
    best = BestModel(ckpt_dir, plan.model, plan.early_stop_evals, plan.early_stop_rise)
    loss_sum, window_steps = 0.0, 0  # finite step losses since the last train line, and how many
    if found:
        state, path = found
        restore_training_state(state, path, model, optimizer, scaler)
        step, tokens_seen, elapsed = state["step"], state["tokens"], state["elapsed_s"]
        sample_index, skipped = state["sample"], state.get("skipped_steps", 0)
        loss_sum, window_steps = state.get("window", (0.0, 0))
        val_tokens = state.get("val_tokens", val_tokens)
        if "best" in state:
            best.load_state_dict(state["best"])
    if world.is_main:  # rank 0 alone writes the run directory
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if found else None)
        attach_loggers(cfg, log, plan, run_dir)
    else:
        log = MetricsLog(os.devnull)
    if not found:
        log.log({"kind": "start", "step": 0, "git": git_revision(), "transforms": applied, "params": plan.params})

    def train_batches(start_sample: int) -> TrainBatches:  # rank r reads micro-batches r, r+N, ... of one stream
        return TrainBatches(data.train_path, data.dtype, plan.seq_len, plan.micro_batch, tc.seed,
                            fraction=plan.data_fraction, start_sample=start_sample + world.rank * plan.micro_batch,
                            device=device, prefetch=cfg.optimizations.prefetch_batches,
                            stride=world.size * plan.micro_batch)  # fmt: skip

    loader = train_batches(sample_index)

    def run_eval(tokens: int):
        batches = val_batches(data.val_path, data.dtype, plan.seq_len, plan.micro_batch, tokens, device)
        with sdpa_backend(plan.attention_kernel):
            return evaluate(model, batches, ctx, data.val_bytes_per_token, cfg.optimizations.loss_chunk_tokens)

    def checkpoint_state():  # FSDP2: a collective; only rank 0 gets the (ordinary, full) state dicts
        weights, optimizer_state = full_state(model, optimizer)
        return {"model": weights, "optimizer": optimizer_state, "scaler": scaler.state_dict(),
                "step": step, "tokens": tokens_seen, "elapsed_s": elapsed,
                "sample": loader.sample - world.rank * plan.micro_batch,  # the stream's position, rank 0's
                "skipped_steps": skipped, "rng": rng_state(), "model_config": plan.model,
                "window": (loss_sum, window_steps), "val_tokens": val_tokens, "best": best.state_dict()}  # fmt: skip

    def micro_loss(x, y):  # forward and loss: one graph when compiled (1.4x faster than per block on the H200)
        with ctx:
            loss = lm_loss(parallel, x, y, cfg.optimizations.chunked_loss, cfg.optimizations.loss_chunk_tokens)
            return loss + moe_aux_loss(model)

    if world.enabled and not sharded and plan.compile:  # DDP: one graph, or one per gradient bucket
        torch._dynamo.config.optimize_ddp = cfg.optimizations.ddp_graphs == "split"
    eager_loss = micro_loss  # what runs should compilation fail on the device
    micro_loss = compile_step(eager_loss, plan.compile and not sharded, device, plan.compile_backend)
    if micro_loss is not eager_loss:
        applied.append(f"torch.compile (forward + loss, {plan.compile_backend})")

    def forward_backward() -> torch.Tensor:
        """The step's micro-batches; gradients land in .grad. Returns the step's mean loss (on the device)."""
        total = torch.zeros((), device=device)
        for i in range(plan.grad_accum):
            x, y = loader.next()
            last = i == plan.grad_accum - 1
            with gradient_sync(parallel, last):  # DDP: once a step; FSDP2: every micro-batch
                loss = micro_loss(x, y)
                scaler.scale(loss / plan.grad_accum).backward()
            total += loss.detach()
        return total / plan.grad_accum

    def save() -> None:
        state = checkpoint_state()  # every rank: FSDP2 gathers the full state dicts onto rank 0
        if world.is_main:
            best.save(world.is_main)  # first: the checkpoint's counters name these best weights
            save_checkpoint(ckpt_dir, state, step, tc.keep_checkpoints)

    def evaluation(at_step: int) -> dict:
        """Evaluate, log, and keep the weights if they are the best so far."""
        record = run_eval(val_tokens)
        is_best = best.update(at_step, record, lambda: full_weights(model))
        log.log({"kind": "eval", "step": at_step, "tokens": tokens_seen, "elapsed_s": time.perf_counter() - start,
                 **record, "best": is_best})  # fmt: skip
        return record

    save_s = time.perf_counter()
    if not found:  # a first checkpoint now: a disk that cannot hold one fails here, and a rollback has a target
        save()
    save_s = time.perf_counter() - save_s  # the final one costs about as much
    last_eval_step = -1

    def finish_s() -> float:
        """Seconds the final checkpoint, evaluation and sample take after the loop, at the latest speed."""
        speed = plan.measured_tokens_per_s or plan.predicted_tokens_per_s
        final_eval_s = max(final_tokens / (3 * speed), last_eval_s * final_tokens / max(1, val_tokens))
        return save_s + final_eval_s + SAMPLE_COST * tc.sample_tokens / (3 * speed)
    guard = NonFiniteGuard(tc.max_bad_steps, divergence_advice(plan.lr, cfg.optim.grad_clip, precision, ckpt_dir))
    on_device = skip_on_device(optimizer) and not scaler.is_enabled()  # fp16: the GradScaler decides, on the host
    pending, grad_norm_value = PendingSteps(), math.nan

    def settle() -> bool:
        """Read the pending steps: count, log and judge the non-finite ones. True: time to roll back."""
        nonlocal loss_sum, window_steps, skipped, grad_norm_value
        for s, loss_value, norm_value, ok in pending.read():
            grad_norm_value = norm_value
            if ok:
                guard.good(s)
                loss_sum, window_steps = loss_sum + loss_value, window_steps + 1
                continue
            skipped += 1
            log.log({"kind": "skip", "step": s + 1, "reason": f"loss={loss_value} grad_norm={norm_value}",
                     "in_a_row": guard.in_a_row + 1, "skipped_steps": skipped})  # fmt: skip
            if guard.bad(s):  # raises DivergedError when rolling back keeps failing
                pending.read()  # the steps after the streak go with the rollback
                return True
        return False

    stop = StopFlag()
    budget = plan.time_budget_s
    bar = tqdm(total=plan.steps, initial=step, disable=not (tc.progress and world.is_main), desc="train", unit="step",
               dynamic_ncols=True)  # one bar for the run: the other processes train the same steps
    start = (time.perf_counter() if found else ready) - elapsed
    last_ckpt = time.perf_counter()
    last_eval_s, window_t, window_tokens = 0.0, time.perf_counter(), 0
    stopped_by = "schedule"
    # the budget, not a step count, ends the run: re-plan the steps from the measured speed as it settles
    calibrate_at = [] if tc.max_steps or plan.measured_tokens_per_s else [0.03, 0.15, 0.4, 0.7]
    calib_t0 = calib_overhead0 = overhead_s = 0.0
    model.train()
    profiler = StepProfiler(run_dir, world.rank, tc.profile_steps, tc.profile_start, device)
    threads = CpuThreads(device == "cpu" and bool(calibrate_at) and not world.enabled)
    try:
        while step < plan.steps:
            lr = lr_at(step, plan.steps, plan.lr, cfg.optim.schedule, cfg.optim.warmup_frac, cfg.optim.min_lr_ratio,
                       cfg.optim.decay_frac)  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            if step > 0 and step % plan.eval_interval == 0 and step != last_eval_step:
                t = time.perf_counter()
                evaluation(step)
                last_eval_step = step
                last_eval_s = time.perf_counter() - t
                overhead_s += last_eval_s
                if best.stop(step, plan.steps, loader.epoch) and not world.enabled:  # the run has stopped paying (ranks: rank 0 decides, below)
                    stopped_by = "early stop"
                    print(f"\n{best.why_stop(step, time.perf_counter() - start, budget)}", flush=True)
                    break
            step_start, step_t = loader.sample, time.perf_counter()
            while True:  # out of memory: the same step again with half the micro-batch, twice as many of them
                try:  # compilation failed: the same step again, eager, its memory re-planned
                    with sdpa_backend(plan.attention_kernel):
                        step_loss = forward_backward()
                    break
                except Exception as e:
                    error = (str(e).splitlines() or [type(e).__name__])[0]
                    if is_out_of_memory(e) and not world.enabled:  # ranks cannot back off one alone
                        record = None
                    elif is_compile_failure(e) and micro_loss is not eager_loss:
                        micro_loss, record = eager_loss, plan_eager_step(plan, cfg, step + 1, root_cause(e))
                    else:
                        raise
                free_memory(model, optimizer, device)  # out here: the exception no longer holds the step's tensors
                log.log(record or back_off(plan, step + 1, error))  # step + 1: the one in flight
                if record:
                    print(f"pufferfish: {plan.reasons['compile']}; micro-batch {plan.micro_batch}", file=sys.stderr)
                atomic_write_text(run_dir / "plan.json", json.dumps(plan.to_dict(), indent=2))  # resumes keep it
                loader.close()
                loader = train_batches(step_start)
            scaler.unscale_(optimizer)
            grad_norm = plain(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))  # FSDP2: a DTensor
            step_loss = mean_across(world, step_loss)  # every rank sees the same loss, so all skip or none
            ok = finite_on_device(step_loss, grad_norm, scaler.is_enabled())
            if on_device:  # a non-finite step makes no update, decided on the device
                optimizer.found_inf = (~ok).float()
                optimizer.step()
                update_moe_biases(model, ok)
            elif ok.item():  # the host decides: one sync
                scaler.step(optimizer)  # skips the step by itself when fp16 gradients overflowed
                update_moe_biases(model)
            else:
                reset_moe_counts(model)
            pending.add(step, step_loss, grad_norm, ok)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += plan.batch_tokens
            window_tokens += plan.batch_tokens
            bar.update(1)
            profiler.step()

            log_now = step % tc.log_interval == 0 or step == plan.steps
            ckpt_due = time.perf_counter() - last_ckpt > tc.ckpt_interval_s
            if world.enabled:  # rank 0's clock, at log intervals: every rank settles, rolls back and saves together
                ckpt_due = log_now and same_on_all(world, ckpt_due)
            rollback = settle() if log_now or ckpt_due or not on_device else False
            if log_now:
                train_loss = loss_sum / window_steps if window_steps else math.nan  # mean over the window's steps
                loss_sum, window_steps = 0.0, 0
                now = time.perf_counter()
                tps = window_tokens / max(1e-9, now - window_t)
                window_t, window_tokens = now, 0
                record = {"kind": "train", "step": step, "train_loss": train_loss, "lr": lr, "tokens_per_s": tps,
                          "tokens": tokens_seen, "elapsed_s": now - start, "grad_norm": grad_norm_value,
                          "epoch": loader.epoch, **moe_metrics(model)}  # fmt: skip
                log.log(record)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}")
            if rollback:  # the last good weights; the data stream goes on past the offending batches
                state, path = load_latest(ckpt_dir)
                restore_training_state(state, path, model, optimizer, scaler)
                log.log({"kind": "rollback", "step": state["step"], "from_step": step, "checkpoint": path.name,
                         "skipped_samples": loader.sample - state["sample"]})  # fmt: skip
                step, tokens_seen = state["step"], state["tokens"]
                loss_sum, window_steps = state.get("window", (0.0, 0))
                bar.n = step
            elif ckpt_due and not guard.in_a_row:  # never mid-streak
                t = time.perf_counter()
                elapsed = t - start
                save()
                last_ckpt = time.perf_counter()
                overhead_s += last_ckpt - t
            elapsed, step_s = time.perf_counter() - start, time.perf_counter() - step_t
            # a CPU compiles nothing: its first steps measure its speed (and threads), before the schedule is under way
            first_on_cpu = step in (1, 2) and device == "cpu" and not world.enabled and bool(calibrate_at)
            if first_on_cpu:
                step_s = threads.after_step(step, step_s, plan)
            if step == CALIBRATE_FROM:
                calib_t0, calib_overhead0 = elapsed, overhead_s
            if (world.is_main and calibrate_at and (first_on_cpu or step > CALIBRATE_FROM + 2
                  and elapsed > calibrate_at[0] * budget) and (log_now or not world.enabled)):  # fmt: skip
                # with ranks: only where they agree on the steps, below
                per_step = step_s if first_on_cpu else \
                    (elapsed - calib_t0 - (overhead_s - calib_overhead0)) / (step - CALIBRATE_FROM)  # fmt: skip
                calibrate_at = calibrate_at if first_on_cpu else calibrate_at[1:]
                evals_left = EVALS_PER_RUN * (1 - elapsed / budget) + 1
                eval_s = max(last_eval_s, val_tokens * per_step / plan.batch_tokens / 3)  # none yet at step 1
                fraction = plan.data_fraction
                plan.recalibrate(step, per_step, budget - elapsed - evals_left * eval_s - finish_s(),
                                 None if world.enabled else MAX_STEP_SHARE * budget)  # fmt: skip
                if plan.data_fraction != fraction:  # more steps than planned: draw them from more of the corpus
                    loader.close()
                    loader = train_batches(loader.sample - world.rank * plan.micro_batch)
                atomic_write_text(run_dir / "plan.json", json.dumps(plan.to_dict(), indent=2))
                val_tokens = min(val_tokens, plan.eval_tokens)
                bar.total = plan.steps
                bar.refresh()
            why = None
            if world.enabled and best.stop(step, plan.steps, loader.epoch):
                why = best.why_stop(step, elapsed, budget)
            elif stop:
                why = f"signal {stop.signal}"
            elif tc.stop_at_step and step >= tc.stop_at_step:
                why = "stop_at_step"
            elif not tc.max_steps and elapsed + step_s + last_eval_s + finish_s() > budget:  # max_steps: it reports
                why = "time budget"
            if world.enabled:  # ranks agree at log intervals only: one host sync there, not every step
                if log_now:
                    why, steps, val_tokens = agree_to_stop(world, why, plan.steps, val_tokens)
                    if steps != plan.steps and not world.is_main:  # rank 0 re-planned from its measured speed
                        fraction = plan.data_fraction
                        plan.set_steps(steps)
                        if plan.data_fraction != fraction:  # as rank 0 did: more of the corpus
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
    settle()  # the last steps' counts (no rollback now: a skipped step left the weights as they were)
    elapsed = time.perf_counter() - start
    save()
    finished = step >= plan.steps or stopped_by in ("time budget", "early stop")
    result = {"step": step, "tokens": tokens_seen, "elapsed_s": elapsed, "stopped_by": stopped_by,
              "skipped_steps": skipped, **peak_memory_bytes(device)}  # fmt: skip
    if finished:  # hand over the best weights, unless the last are as good
        last_loss = evaluation(step)["val_loss"] if step != last_eval_step else best.last_loss
        handed = best.hand_over(model, last_loss)
        best.save(world.is_main)
        result.update({"handed_over": "best" if handed else "last", "handed_over_step": best.step if handed else step,
                       "last_val_loss": last_loss, "best_val_loss": min(best.loss, last_loss)})  # fmt: skip
        result.update(run_eval(final_tokens))  # the final number: the full eval set, or what the budget allows
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
    threads.restore()
    if stop:
        stop.exit_for_requeue()  # after the checkpoint: a launcher's own handler runs, then exit 144
    return result


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")  # absolute: see __main__ below
@log_console  # outside the next one: train.log gets its one-line error too
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    if cfg.job == "measure":
        from .measure import measure

        measure(cfg)
    elif cfg.job == "train":
        train(cfg)
    else:
        raise ConfigError(f"job={cfg.job!r}; allowed: train, measure")


if __name__ == "__main__":
    from pufferfish.overrides import check_command_line

    exit_on_user_error(check_command_line)(sys.argv[1:])  # Hydra's own errors as one line, exit 2
    # the importable module's main, not __main__'s: launchers (submitit) pickle the task function by name
    from pufferfish.train import main as importable_main

    importable_main()
