"""The Markdown tables: which pairs share a job (--list), and the rows with their verdicts."""

from __future__ import annotations

from pufferfish.resolver.hardware import GIB

from ..sweep_tools import allocator_cap
from .grouping import Pair, hardware_of
from .rows import path_text


def gib(x) -> str:
    return "" if x is None else f"{x / GIB:.2f}"


def grouping_text(groups: list[list[Pair]], where: str) -> str:
    pairs = [p for g in groups for p in g]
    data = sorted({(p.plan["corpus_tokens"], p.plan["model"]["vocab_size"]) for p in pairs if p.plan})
    lines = [f"{len(pairs)} profile x mode pairs need {len(groups)} distinct jobs, for {where}.",
             "The grouping holds for that device and this data only: plans follow the card's memory and the "
             "corpus size (" + "; ".join(f"{c:,} corpus tokens, vocabulary {v:,}" for c, v in data) + ").", "",
             "| job | runs | and stands for | layers x dims | micro x accum x seq | card's step | ckpt | cap GiB |",
             "|" + "---|" * 8]  # fmt: skip
    for i, (first, *rest) in enumerate(groups, 1):
        others = ", ".join(p.name for p in rest)
        if first.plan is None:
            lines.append(f"| {i} | {first.name} | | | | | | not planned here: {first.error} |")
            continue
        plan, hw = first.plan, hardware_of(first.plan)
        accum = "/".join(sorted({str(p.plan["grad_accum"]) for p in (first, *rest)}, key=int))
        lines.append(f"| {i} | {first.name} | {others} | {plan['model']['num_layers']} x {plan['model']['num_dims']} "
                     f"| {plan['micro_batch']} x {accum} x {plan['seq_len']} | {path_text(plan)} | "
                     f"{'yes' if plan['grad_ckpt'] else 'no'} | {gib(allocator_cap(hw))}"
                     f"{' (emulated)' if hw.emulated else ''} |")  # fmt: skip
    return "\n".join(lines)


def markdown(rows: list[dict], device: str) -> str:
    peak = "measured peak GiB" if device != "cpu" else "measured peak RSS GiB"
    lines = [f"| profile | mode | layers x dims | micro x accum x seq | card's step | ckpt | steps | predicted GiB | {peak} "
             "| reserved GiB | cap GiB | use % | predicted/measured | OOM? | binding (without max_steps) | verdict |",
             "|" + "---|" * 16]  # fmt: skip
    for r in rows:
        shape = f"{r['num_layers']} x {r['num_dims']}" if "num_layers" in r else ""
        batch = f"{r['micro_batch']} x {r['grad_accum']} x {r['seq_len']}" if "micro_batch" in r else ""
        steps = str(r.get("steps", "")) + ("" if r.get("stopped_by") in ("schedule", None) else f" ({r['stopped_by']})")
        use = f"{100 * r['use']:.0f}" if "use" in r else ""
        ratio = f"{r['predicted_over_measured']:.2f}" if "predicted_over_measured" in r else ""
        cap = gib(r.get("cap_bytes")) + (" (emulated)" if r.get("emulated") else "")
        ckpt = {True: "yes", False: "no"}.get(r.get("grad_ckpt"), "")
        same = f" (same plan as {r['same_run_as']}: its run)" if r.get("same_run_as") else ""
        lines.append(f"| {r['profile']} | {r['mode']} | {shape} | {batch} | {r.get('path', r.get('precision', ''))} | {ckpt} | "
                     f"{steps} | {gib(r.get('predicted_peak_bytes'))} | {gib(r.get('measured_peak_bytes'))} | "
                     f"{gib(r.get('peak_reserved_bytes'))} | {cap} | {use} | {ratio} | {'yes' if r.get('oom') else 'no'} "
                     f"| {r.get('binding_constraint', '')} | {r['verdict']}{same} |")  # fmt: skip
    return "\n".join(lines)
