"""Each finished run's measurements read into a row per pair it stands for, with the pair's verdict."""

from __future__ import annotations

import json
from pathlib import Path

from pufferfish.api import compose_config
from pufferfish.resolver import Hardware, fits, make_plan, memory_shape
from pufferfish.resolver.plan import planned_config, ran_optimizer_name
from pufferfish.runlog import read_metrics

from ..sweep_tools import allocator_cap
from .grouping import Pair, as_run, config_overrides, hardware_of, ran_as_planned
from .scheduler import Job

TARGET_USE = 0.70


def read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.exists() else default


def read_rows(job: Job, extra: list[str], logs: Path, steps: int, time_limit_s: float) -> tuple[dict, list[Pair]]:
    """The rows of every pair the job's run stands for, by pair name, and the pairs that must run on their own
    after all: those of a run whose own plan is not the one planned here for it."""
    first, others = job.pairs[0], job.pairs[1:]
    row = read_row(job, first, extra, logs, steps)
    rows = {first.name: row}
    run_plan = read_json(job.run_dir / "plan.json")
    if first.error:
        row["notes"].append(f"not planned before the run ({first.error})")
    if not others:
        return rows, []
    if run_plan and not ran_as_planned(first, run_plan, bool(row["oom_backoffs"]), time_limit_s):
        row["notes"].append("its run's plan is not the one planned for it before the run: "
                            f"{', '.join(p.name for p in others)} run on their own")  # fmt: skip
        return rows, others
    row["notes"].append(f"its run stands for {', '.join(p.name for p in others)} too (the same plan and cap)")
    for pair in others:
        rows[pair.name] = read_row(job, pair, extra, logs, steps)
        rows[pair.name]["notes"].insert(0, f"same plan as {first.profile}/{first.mode}: its run's measurements")
        rows[pair.name]["same_run_as"] = f"{first.profile}/{first.mode}"
    return rows, []


def read_row(job: Job, pair: Pair, extra: list[str], logs: Path, steps: int) -> dict:
    """One pair's row from its job's run: the run's measurements, the pair's own plan (the run's plan.json
    for the job's own pair) and verdict."""
    d, err_log = job.run_dir, logs / f"{job.name}.err"
    row = {"profile": pair.profile, "mode": pair.mode, "run_dir": str(d), "exit": job.rc, "wall_s": round(job.wall_s, 1),
           "gpu": job.gpu, "shared_card": job.shared, "notes": list(job.notes)}  # fmt: skip
    err = err_log.read_text(errors="replace") if err_log.exists() else ""
    plan, summary = read_json(d / "plan.json"), read_json(d / "summary.json", {})
    if plan and pair is not job.pairs[0]:
        plan = as_run(pair.plan, plan)
    metrics = read_metrics(d / "metrics.jsonl") if (d / "metrics.jsonl").exists() else []  # a killed job's too
    row["oom_backoffs"] = [m for m in metrics if m.get("kind") == "oom_backoff"]
    for fallback in (m for m in metrics if m.get("kind") == "compile_fallback"):
        row["notes"].append(f"compilation failed at step {fallback['step']}, ran eager ({fallback['error']})")
    row["oom"] = bool(row["oom_backoffs"]) or (job.rc != 0 and "out of memory" in err.lower())
    row["steps"] = summary.get("step", max((m["step"] for m in metrics if m.get("kind") == "train"), default=0))
    row["stopped_by"] = summary.get("stopped_by")
    if job.rc != 0 or not summary:
        row["stderr_tail"] = "\n".join(err.splitlines()[-25:])
    if plan:
        hw = hardware_of(plan)
        row.update(num_layers=plan["model"]["num_layers"], num_dims=plan["model"]["num_dims"],
                   micro_batch=plan["micro_batch"], grad_accum=plan["grad_accum"], seq_len=plan["seq_len"],
                   precision=plan["precision"], grad_ckpt=plan["grad_ckpt"], emulated=hw.emulated, path=path_text(plan),
                   predicted_peak_bytes=plan["predicted_peak_bytes"], vram_bytes=plan["vram_bytes"],
                   cap_bytes=allocator_cap(hw), binding_in_run=plan["binding_constraint"],
                   optimizer=ran_optimizer_name(plan.get("optimizer", {})))  # fmt: skip
        row.update(plan_without_max_steps(pair.profile, pair.mode, extra, plan, hw, row))
    peak = summary.get("peak_mem_bytes", summary.get("peak_rss_bytes"))  # allocated on a GPU, RSS on the CPU
    row.update(peak_allocated_bytes=summary.get("peak_mem_bytes"), peak_reserved_bytes=summary.get("peak_reserved_bytes"),
               peak_rss_bytes=summary.get("peak_rss_bytes"), measured_peak_bytes=peak)  # fmt: skip
    if peak and plan:
        row["use"] = peak / row["cap_bytes"]
        row["predicted_over_measured"] = plan["predicted_peak_bytes"] / peak
    row["verdict"] = verdict(row, steps)
    return row


def path_text(plan: dict) -> str:
    """The card's step as the plan ran it (an old plan.json has no such fields)."""
    if "compile" not in plan:
        return plan["precision"]
    return f"{plan['precision']}, {'compiled' if plan['compile'] else 'eager'}, {plan['attention_kernel']}"


def plan_without_max_steps(profile: str, mode: str, extra: list[str], plan: dict, hw: Hardware, row: dict) -> dict:
    """The run's plan made again without train.max_steps: its binding constraint, the micro-batch as planned
    (before any out-of-memory back-off), and whether twice that micro-batch would fit the plan's budget."""
    try:
        cfg = compose_config([f"gpu={profile}", f"mode={mode}", *config_overrides(extra)])
        free = make_plan(cfg, hw, plan["model"]["vocab_size"], plan["corpus_tokens"])
    except Exception as e:  # noqa: BLE001 - the row still stands on the run's own plan
        row["notes"].append(f"binding is the run's: planning without max_steps failed ({str(e).splitlines()[0]})")
        return {"binding_constraint": plan["binding_constraint"]}
    out = {"binding_constraint": free.binding_constraint, "micro_batch": free.micro_batch, "grad_accum": free.grad_accum,
           "micro_batch_set_by_user": bool(cfg.train.micro_batch)}  # fmt: skip
    same = free.model == plan["model"] and free.grad_ckpt == plan["grad_ckpt"] and \
        free.micro_batch * free.grad_accum == plan["micro_batch"] * plan["grad_accum"]  # fmt: skip
    if not same or (not row["oom_backoffs"] and free.micro_batch != plan["micro_batch"]):
        row["notes"].append("train.max_steps changed the plan: the run's shape is shown")
        out.update(micro_batch=plan["micro_batch"], grad_accum=plan["grad_accum"])
    ran = planned_config(cfg, plan.get("optimizer", {}))  # the optimizer the run had (optim.name=auto's choice)
    doubled = memory_shape(plan["model"], ran, hw, 2 * out["micro_batch"], plan["grad_ckpt"])
    out["double_micro_batch_fits"] = fits(doubled, hw)
    return out


def verdict(row: dict, steps: int) -> str:
    if row["oom"]:
        return "OOM"
    if any(n.startswith("killed") for n in row.get("notes", [])):
        return "timeout"
    if row["exit"] != 0 or row.get("measured_peak_bytes") is None or "use" not in row:
        return "crash"
    if row["steps"] < min(2, steps):  # step 2 is the first with AdamW's state and the activations at once
        return f"incomplete ({row['steps']} step, {row['stopped_by']})"
    if row["use"] >= TARGET_USE:
        return "ok"
    if row["binding_constraint"] != "memory":
        if row.get("micro_batch_set_by_user"):
            return "not memory-bound (micro-batch set by you)"
        if row["grad_accum"] == 1:
            return "not memory-bound (batch at target)"
        if row.get("double_micro_batch_fits"):
            return "not memory-bound (micro-batch cap)"
    return f"below {TARGET_USE * 100:.0f} %"
