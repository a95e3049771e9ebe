"""python -m pufferfish.lab.measure [group=option ...]: a few training steps at one fixed shape; records peak
memory, tokens/s and whether the step fits.

What every sweep job runs (python -m pufferfish.lab.measure -m experiment=memory_table or speed_table); its
settings are conf/measure.yaml's, the training config's plus `measure` (lab/config.py). It writes measure.json into
its own run directory. An out-of-memory is a result ("fits": false), not a crash: Hydra's basic launcher
would record the exception, run the other jobs and then fail the whole multirun (a SystemExit stops it at
once), so no expected outcome may raise here. On CPU nothing is measured: the peak is the memory model's.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import replace

import hydra
import torch
from omegaconf import DictConfig

from pufferfish.checkpoint import atomic_write_text
from pufferfish.console import log_console
from pufferfish.data import prepare_data
from pufferfish.data.loader import TrainBatches
from pufferfish.errors import ConfigError, PufferfishError, exit_on_user_error
from pufferfish.model import ModelConfig, build_model
from pufferfish.optim import build_optimizer
from pufferfish.paths import CONF_DIR
from pufferfish.reliability import is_out_of_memory
from pufferfish.resolver import (
    apply_memory_cap,
    count_params,
    detect_hardware,
    make_plan,
    predict_peak_bytes,
    prefer_expandable_segments,
)
from pufferfish.resolver.capabilities import card_path
from pufferfish.resolver.hardware import GIB
from pufferfish.resolver.plan import chosen_config
from pufferfish.resolver.speed import flops_per_token, predict_tokens_per_s
from pufferfish.rundir import run_directory, save_config
from pufferfish.runlog import git_revision
from pufferfish.step import StepSpec, TrainStep, use_tf32
from pufferfish.transforms import apply_speed_transforms

from . import config as _schemas  # noqa: F401  (registers the measuring job's schema with Hydra)
from .sweep_tools import (
    SCHEMA,
    allocator_cap,
    job_identity,
    job_prediction,
    predicted_max_layers,
    target_hardware,
)

WARMUP_STEPS = 8  # the peer's: steps left out of the timing (compilation, autotuning, allocator growth)
NOMINAL_CORPUS_TOKENS = 10**9  # random tokens have no corpus; the resolver sizes unset fields as if it were large


def _train_steps(cfg, mc: dict, ckpt: bool, micro: int, device: str, precision: str, data, path) -> dict:
    """measure.steps training steps (step.py's, as train() runs them) on the card's path; step times are
    synchronised on CUDA."""
    torch.manual_seed(cfg.train.seed)
    opt, seq_len, cuda = cfg.optimizations, mc["seq_len"], device.startswith("cuda")
    model = build_model(ModelConfig.from_dict(mc), device)
    applied = apply_speed_transforms(model, ckpt, False, device)
    optimizer = build_optimizer(model, cfg.optim, 1e-4, path.fused_adamw)
    spec = StepSpec(precision=precision, grad_clip=cfg.optim.grad_clip, chunked_loss=bool(opt.chunked_loss),
                    loss_chunk_tokens=opt.loss_chunk_tokens, compile=path.compile, compile_backend=path.compile_backend,
                    attention_kernel=path.attention_kernel)  # fmt: skip
    train_step = TrainStep(model, optimizer, spec, device)
    if train_step.compiled:
        applied.append(f"torch.compile (forward + loss, {path.compile_backend})")
    loader = (TrainBatches(data.train_path, data.dtype, seq_len, micro, cfg.train.seed, device=device,
                           prefetch=opt.prefetch_batches) if data else None)  # fmt: skip
    tokens = torch.randint(mc["vocab_size"], (micro, seq_len + 1), device=device)  # (B, T+1)
    next_batch = loader.next if loader else lambda: (tokens[:, :-1], tokens[:, 1:])
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)  # the weights stay counted: they are still allocated
    times = []
    try:
        for _ in range(cfg.measure.steps):
            start = time.perf_counter()
            loss, _, _ = train_step(next_batch)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        if loader:
            loader.close()
    warmup = min(WARMUP_STEPS, len(times) // 2)
    out = {"loss": loss.item(), "transforms": applied, "step_times_s": times, "warmup_steps": warmup,
           "tokens_per_s": micro * seq_len / statistics.median(times[warmup:])}  # fmt: skip
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out


def _attempt(*args) -> tuple[dict | None, str | None]:
    """The steps' result, or (None, the out-of-memory message); any other error is a bug and is raised."""
    try:
        return _train_steps(*args), None
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        message = str(e).splitlines()[0]
    gc.collect()  # the traceback's frames held the model, its optimizer state and activations
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None, message


def measure(cfg) -> dict:
    prefer_expandable_segments()  # as train() does: the same allocator as the runs it measures for
    run_dir = run_directory(cfg)
    save_config(cfg, run_dir)
    identity = job_identity()
    try:
        record = {"schema": SCHEMA, "run_dir": str(run_dir), **identity, **_measure(cfg)}
    except PufferfishError as e:  # in a sweep, a job's own mistake is its result: the other jobs still run
        if not identity["multirun"]:
            raise
        record = {"schema": SCHEMA, "run_dir": str(run_dir), **identity, "fits": None, "error": str(e)}
    atomic_write_text(run_dir / "measure.json", json.dumps(record, indent=2))
    peak, tps, oom = record.get("peak_bytes"), record.get("tokens_per_s"), record.get("oom") or record.get("error")
    print(f"measure {record['technique'] or cfg.optimizations.name} L={record.get('num_layers')}: fits={record['fits']}, "
          f"peak {'?' if peak is None else f'{peak / GIB:.2f}'} GiB ({'measured' if record.get('measured') else 'predicted'}), "
          f"{f'{tps:,.0f} tokens/s' if tps else 'no speed'} -> {run_dir}/measure.json" + (f"\n  {oom}" if oom else ""))  # fmt: skip
    return record


def _measure(cfg) -> dict:
    tc, how = cfg.train, cfg.measure
    if how.steps < 1 or how.batches not in ("random", "data"):
        raise ConfigError(f"measure.steps={how.steps} (>= 1) and measure.batches={how.batches!r} (random | data) "
                          f"describe the measuring job")  # fmt: skip
    hw = detect_hardware(cfg.gpu, cfg.optimizations, tc.device)
    device, cuda = hw.device, hw.device.startswith("cuda")
    data = prepare_data(cfg.data, progress=False) if how.batches == "data" else None
    vocab = cfg.model.vocab_size or (data.vocab_size if data else cfg.data.vocab_size or 8192)
    cfg = chosen_config(cfg, target_hardware(cfg, hw), vocab, NOMINAL_CORPUS_TOKENS)  # optim.name=auto: a run's choice
    L, d, micro = cfg.model.num_layers, cfg.model.num_dims, tc.micro_batch
    if not (L and d and micro):  # the resolver's choice for whatever the config leaves open
        plan = make_plan(cfg, target_hardware(cfg, hw), vocab, NOMINAL_CORPUS_TOKENS)
        L, d, micro = L or plan.model["num_layers"], d or plan.model["num_dims"], micro or plan.micro_batch
    mc, ckpt, shape = job_prediction(cfg, hw, L, d, micro, vocab)
    predicted = predict_peak_bytes(shape)
    path = card_path(cfg, hw)  # the step the card runs (emulated: the profile's card, not this GPU)
    cap = allocator_cap(hw)
    if cuda:  # Hydra's basic launcher runs a sweep's jobs in one process: start each from a clean allocator
        torch.cuda.set_device(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, torch.device(device).index or 0)
        apply_memory_cap(hw)  # a no-op unless the profile is smaller than the device
        use_tf32(device, path.tf32)  # as train(): the card's
        if path.compile:
            torch._dynamo.reset()  # compile afresh, as a run does, not from an earlier job's cache
    result, oom, peak_uncapped = None, None, False
    if cuda or (hw.profile == "cpu" and predicted.total <= cap):  # on CPU: run only what the CPU is the target of
        result, oom = _attempt(cfg, mc, ckpt, micro, device, hw.precision, data, path)
        if result is None and hw.emulated:  # does not fit the cap: measure what it would need, uncapped
            torch.cuda.set_per_process_memory_fraction(1.0, torch.device(device).index or 0)
            result, _ = _attempt(cfg, mc, ckpt, micro, device, hw.precision, data, path)
            peak_uncapped = result is not None
    elif predicted.total > cap:  # never tried: a CPU does not fail on cue, it swaps or gets killed
        oom = f"predicted out of memory: {predicted.total / GIB:.2f} GiB over the {cap / GIB:.2f} GiB cap (not run)"
    fits = oom is None and (cuda or predicted.total <= cap)
    tps = result["tokens_per_s"] if result and not peak_uncapped else None
    model_flops = flops_per_token(replace(shape, grad_ckpt=False))  # 6N + 12LdT: the published MFU convention
    target = target_hardware(cfg, hw)
    return {
        "git": git_revision(), "device": device, "device_name": hw.device_name, "profile": hw.profile,
        "emulated": hw.emulated, "cap_bytes": cap, "torch": torch.__version__, "model": mc, "num_layers": L,
        "micro_batch": micro, "params": count_params(shape), "precision": target.precision, "grad_ckpt": ckpt,
        "attention_math": shape.attention_math, "sdpa_backend": cfg.attention.sdpa_backend,
        "optimizer": str(cfg.optim.name), "compile": path.compile, "fused_adamw": path.fused_adamw, "attention_kernel": path.attention_kernel,
        "chunked_loss": bool(cfg.optimizations.chunked_loss), "prefetch_batches": int(cfg.optimizations.prefetch_batches),
        "batches": how.batches, "steps": how.steps, "fits": fits, "measured": cuda, "oom": oom,
        # measured on CUDA (after an out-of-memory under the cap: what it needed uncapped); the memory model's on CPU
        "peak_bytes": (result or {}).get("peak_bytes") if cuda else predicted.total, "peak_uncapped": peak_uncapped,
        "peak_reserved_bytes": (result or {}).get("peak_reserved_bytes"), "predicted_peak_bytes": predicted.total,
        "memory_breakdown": predicted.to_dict(), "predicted_max_layers": predicted_max_layers(cfg, hw, d, micro, vocab),
        "tokens_per_s": tps, "model_tflops": tps * model_flops / 1e12 if tps else None,
        "predicted_tokens_per_s": predict_tokens_per_s(shape, target.peak_flops, target.mfu, target.device != "cpu",
                                                       bandwidth=target.bandwidth),
        **{k: (result or {}).get(k) for k in ("step_times_s", "warmup_steps", "transforms", "loss")},
    }  # fmt: skip


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="measure")  # absolute: see __main__ below
@log_console
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    measure(cfg)


if __name__ == "__main__":
    from pufferfish.overrides import check_command_line

    exit_on_user_error(check_command_line)(sys.argv[1:], "measure", "pufferfish.lab.measure")  # one line, exit 2
    # the importable module's main, not __main__'s: launchers (submitit) pickle the task function by name
    from pufferfish.lab.measure import main as importable_main

    importable_main()
