"""Every gpu profile x mode pair's plan, made here as its job would make it, and which pairs share a job."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from omegaconf import OmegaConf

from pufferfish.api import compose_config
from pufferfish.data import prepare_data
from pufferfish.resolver import Hardware, detect_hardware, make_plan
from pufferfish.resolver.hardware import CUDA_CONTEXT_BYTES, hardware_on
from pufferfish.rundir import data_config
from pufferfish.validate import validate

from ..sweep_tools import allocator_cap

PROFILES = "gtx1650 gtx1060 rtx2060 rtx3060 rtx4060 rtx3090 rtx4090 a100_40gb a100_80gb h100 h200".split()
MODES = "ultra_fast quick_dev standard extended".split()


@dataclass
class Pair:
    """One gpu profile x mode, and the plan it gets here for the card its job will run on."""

    profile: str
    mode: str
    plan: dict | None = None  # Plan.to_dict(), made with the job's own overrides
    key: str | None = None  # memory_key: pairs with the same one run as one job; None: a job of its own
    error: str = ""  # why no plan could be made here (its job runs alone, and shows it)

    @property
    def name(self) -> str:
        return f"{self.profile}-{self.mode}"


def config_overrides(extra: list[str]) -> list[str]:
    """The extra overrides that shape the plan (Hydra's own settings and the run directory do not)."""
    skip = ("hydra.", "hydra/", "run_dir=", "train.max_steps=", "dry_run=")
    return [o for o in extra if not o.lstrip("+~").startswith(skip)]


def job_overrides(profile: str, mode: str, args, extra: list[str]) -> list[str]:
    """A job's Hydra overrides, but its run directory."""
    device = "cpu" if args.device == "cpu" else "cuda:0"  # each job sees its one GPU (CUDA_VISIBLE_DEVICES)
    return [f"gpu={profile}", f"mode={mode}", f"train.max_steps={args.steps}", "train.eval_interval=1000000000",
            "train.sample_tokens=0", "train.progress=false", "train.keep_checkpoints=1", f"train.device={device}",
            *extra]  # fmt: skip


def job_time_limit(args) -> float:
    """The longest a job can run: --timeout, or --max-minutes when shorter."""
    return min(args.timeout, 60 * args.max_minutes if args.max_minutes else float("inf"))


def run_config(cfg) -> dict:
    """A job's config but for its gpu profile and mode: what those two do to a run, its plan carries (the model,
    micro-batch, precision, checkpointing, the hardware's cap; the mode's time budget in memory_key)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in ("gpu", "mode", "run_dir"):
        config.pop(key, None)
    return config


def memory_key(plan: dict, config: dict, time_limit_s: float) -> str:
    """What sets a job's peak memory and its allocator's cap, and how far its steps get: pairs with the same
    key run the very same job, so one run measures them all.

    The accumulation counts only as one micro-batch or several (pufferfish/train.py's step): from the second
    micro-batch on, the gradients of the first are held (they accumulate in place) beside a whole forward and
    backward; with one, the last step's gradients were freed (zero_grad to None) and a step's gradients grow
    while its activations are released. The mode's time budget (and then the exact accumulation, which sets
    how many steps fit in it) counts where it can end the job before the job's own time limit."""
    hw = hardware_of(plan)
    budget_binds = plan["time_budget_s"] < time_limit_s
    return json.dumps({
        "model": plan["model"], "micro_batch": plan["micro_batch"], "seq_len": plan["seq_len"],
        "precision": plan["precision"], "grad_ckpt": plan["grad_ckpt"], "steps": plan["steps"],
        "compile": plan.get("compile"), "attention_kernel": plan.get("attention_kernel"), "tf32": plan.get("tf32"),
        "world_size": plan.get("world_size", 1), "accumulates": plan["grad_accum"] > 1,
        "grad_accum": plan["grad_accum"] if budget_binds else None,
        "time_budget_s": plan["time_budget_s"] if budget_binds else None,
        "cap_bytes": allocator_cap(hw), "emulated": hw.emulated, "device": hw.device,
        "data_fraction": plan["data_fraction"] if hw.device == "cpu" else None,  # peak RSS holds the pages read
        "config": config,
    }, sort_keys=True)  # fmt: skip


def hardware_of(plan: dict) -> Hardware:
    return Hardware(**{k: v for k, v in plan["hardware"].items() if k in {f.name for f in fields(Hardware)}})


def pair_for(profile: str, mode: str, cfg, plan: dict, time_limit_s: float) -> Pair:
    return Pair(profile, mode, plan, memory_key(plan, run_config(cfg), time_limit_s))


def group_pairs(pairs: list[Pair]) -> list[list[Pair]]:
    """Pairs with the same key, in the order given; each group's first runs for all: the one with the fewest
    accumulation steps (the same peak, the shortest job), then the first given."""
    groups: dict[str, list[Pair]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.key or f"alone {i}", []).append(pair)
    return [sorted(g, key=lambda p: p.plan["grad_accum"] if p.plan else 0) for g in groups.values()]


def ran_as_planned(pair: Pair, run_plan: dict, backed_off: bool, time_limit_s: float) -> bool:
    """Whether the run's own plan (plan.json) is the one planned here for its pair: only then does the run
    stand for the other pairs of its group (an out-of-memory back-off keeps the micro-batch x accumulation)."""
    planned, ran = pair.plan, dict(run_plan)
    if planned is None or pair.key is None:
        return False
    if backed_off and ran["micro_batch"] * ran["grad_accum"] == planned["micro_batch"] * planned["grad_accum"]:
        ran.update(micro_batch=planned["micro_batch"], grad_accum=planned["grad_accum"])
    return memory_key(ran, json.loads(pair.key)["config"], time_limit_s) == pair.key


def as_run(planned: dict, ran: dict) -> dict:
    """Another pair's plan as the shared run ran it: after an out-of-memory back-off, the run's micro-batch
    and the pair's accumulation scaled alike."""
    scale = max(1, planned["micro_batch"] // max(1, ran["micro_batch"]))
    return {**planned, "micro_batch": ran["micro_batch"], "grad_accum": planned["grad_accum"] * scale}


def plan_pairs(args, extra: list[str], card: tuple[str, int] | None) -> list[Pair]:
    """Every pair's plan, as its job would make it (pufferfish/rundir.py: data_config caps the default corpus to
    what the budget can use, plan_for plans on the prepared data), for the card (name, bytes) its job will see;
    card None: the CPU. Prepares every corpus the jobs will read, so none of them builds one."""
    prepared, pairs, limit = {}, [], job_time_limit(args)
    skip = ("hydra.", "hydra/", "run_dir=", "dry_run=")
    for profile, mode in args.pairs:
        try:
            cfg = compose_config([o for o in job_overrides(profile, mode, args, extra)
                                  if not o.lstrip("+~").startswith(skip)])  # fmt: skip
            validate(cfg)
            if card:  # the card as its job will see it: all free but the CUDA context
                name, total = card
                hw = hardware_on(cfg.gpu, cfg.optimizations, cfg.train.device, name, total,
                                 total - CUDA_CONTEXT_BYTES)  # fmt: skip
            else:
                hw = detect_hardware(cfg.gpu, cfg.optimizations, cfg.train.device)
            data_cfg = data_config(cfg, hw=hw)  # the job's: the default corpus capped to what its budget can use
            data_key = OmegaConf.to_yaml(data_cfg)
            if data_key not in prepared:
                prepared[data_key] = prepare_data(data_cfg, progress=False)
            data = prepared[data_key]
            plan = make_plan(cfg, hw, data.vocab_size, data.train_tokens)
        except Exception as e:  # noqa: BLE001 - its job runs alone and shows the error in full
            pairs.append(Pair(profile, mode, error=(str(e).splitlines() or [type(e).__name__])[0]))
            continue
        pairs.append(pair_for(profile, mode, cfg, plan.to_dict(), limit))
    return pairs
