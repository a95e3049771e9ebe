"""The plan as a person reads it: one table, each decision with its reason."""

from __future__ import annotations

from .plan import Plan

GIB = 2**30


def format_plan(plan: Plan) -> str:
    m, hw, mem = plan.model, plan.hardware, plan.memory_breakdown
    moe = f", MoE {m['moe_num_experts']} experts top-{m['moe_active_experts']}" if m["use_moe"] else ""
    rows = [
        ("gpu", f"{hw['profile']} on {hw['device_name']}" + (" (emulated)" if hw["emulated"] else "")),
        ("model", f"{m['num_layers']} layers x {m['num_dims']} dims, {m['num_heads']} heads / "
                  f"{m['num_kv_heads']} kv heads, ffn {m['ffn_dims']}, vocab {m['vocab_size']}{moe}"),
        ("parameters", f"{plan.params / 1e6:.2f}M" + (f" ({plan.active_params / 1e6:.2f}M active)"
                                                      if plan.active_params != plan.params else "")),
        ("batch", f"{plan.micro_batch} x {plan.seq_len} tokens x {plan.grad_accum} accumulation "
                  f"= {plan.batch_tokens:,} tokens per step"),
        ("precision", plan.precision + (", gradient checkpointing" if plan.grad_ckpt else "")),
        ("step", f"{'compiled' if plan.compile else 'eager'}, attention {plan.attention_kernel}"
                 f"{', fused AdamW' if plan.fused_adamw else ''}{', TF32' if plan.tf32 else ''}"),
        ("memory", f"{mem['total'] / GIB:.2f} GiB predicted of {plan.vram_bytes / GIB:.2f} GiB"),
        ("", "at the peak: " + "  ".join(f"{k} {v / GIB:.2f}" for k, v in mem.items() if k != "total" and v)),
        ("speed", f"{plan.predicted_tokens_per_s:,.0f} tokens/s predicted"
                  + (" (share of peak assumed)" if hw.get("mfu_assumed") else "")
                  + (f" for {hw['profile']}; this run has {hw['device_name']}'s speed" if hw["emulated"] else "")),
        ("budget", f"{plan.time_budget_s / 3600:.3f} h -> {plan.steps:,} steps, {plan.train_tokens / 1e6:.2f}M tokens"),
        ("data", f"{plan.data_fraction:.1%} of {plan.corpus_tokens / 1e6:.2f}M tokens, {plan.epochs:.2f} epochs"),
        ("lr", f"{plan.lr:.2e}" + (f" (AdamW), Muon {plan.optimizer['muon_lr']:.2e}"
                                   if plan.optimizer.get("name") == "muon" else "")),
        ("binding", plan.binding_constraint),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = ["Plan", "-" * 4] + [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", "Why"] + [f"  {k}: {v}" for k, v in plan.reasons.items()]
    lines += [f"  note: {n}" for n in hw["notes"]]
    return "\n".join(lines)
