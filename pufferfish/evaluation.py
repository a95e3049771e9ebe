"""Evaluation during a run and at its end: validation loss at the plan's cadence, the best weights kept
(best.py), the final evaluation of what is handed over, and a text sample."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .best import BestModel
from .checkpoint import atomic_write_text
from .data.loader import val_batches
from .loss import lm_loss
from .sharding import full_weights
from .transforms import sdpa_backend


@torch.no_grad()
def evaluate(model, batches, ctx, bytes_per_token: float, chunk_tokens: int = 4096) -> dict:
    """Validation loss, perplexity and bits per byte. The loss is taken in chunks of `chunk_tokens`: the eager
    full-batch loss would hold ~10 bytes per logit (16-bit logits, their fp32 copy and log-softmax), more than
    a compiled training step keeps for the same micro-batch, and an evaluation must not peak above training."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with ctx:
            total += lm_loss(model, x, y, chunked=True, chunk_tokens=chunk_tokens).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    loss = total / max(1, count)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": loss / math.log(2) / bytes_per_token}


class Evaluator:
    """The run's evaluations: every plan.eval_interval steps on plan.eval_tokens validation tokens (fewer
    where the split is shorter), each logged and offered to the best model; the final one reads
    plan.final_eval_tokens."""

    def __init__(self, model, data, plan, ctx, device: str, best: BestModel, log):
        self.model, self.data, self.plan, self.ctx, self.device = model, data, plan, ctx, device
        self.best, self.log = best, log
        self.tokens = min(plan.eval_tokens, data.val_tokens)
        self.final_tokens = min(plan.final_eval_tokens, data.val_tokens)
        self.last_step, self.last_s = -1, 0.0  # the latest evaluation's step and seconds

    def due(self, step: int) -> bool:
        return step > 0 and step % self.plan.eval_interval == 0 and step != self.last_step

    def measure(self, tokens: int) -> dict:
        batches = val_batches(self.data.val_path, self.data.dtype, self.plan.seq_len, self.plan.micro_batch,
                              tokens, self.device)  # fmt: skip
        with sdpa_backend(self.plan.attention_kernel):
            return evaluate(self.model, batches, self.ctx, self.data.val_bytes_per_token, self.plan.loss_chunk_tokens)

    def __call__(self, step: int, tokens_seen: int, elapsed_s: float) -> dict:
        """Evaluate, log, and keep the weights if they are the best so far (every rank: FSDP2 gathers them)."""
        t = time.perf_counter()
        record = self.measure(self.tokens)
        is_best = self.best.update(step, record, lambda: full_weights(self.model))
        self.log.log({"kind": "eval", "step": step, "tokens": tokens_seen, "elapsed_s": elapsed_s, **record,
                      "best": is_best})  # fmt: skip
        self.last_step, self.last_s = step, time.perf_counter() - t
        return record

    def hand_over(self, step: int, tokens_seen: int, elapsed_s: float, is_main: bool) -> dict:
        """At the end: the last weights evaluated too, the better of them and the best loaded into the model,
        then the final evaluation of those. Returns what summary.json says of them."""
        last_loss = self(step, tokens_seen, elapsed_s)["val_loss"] if step != self.last_step else self.best.last_loss
        handed = self.best.hand_over(self.model, last_loss)
        self.best.save(is_main)
        return {"handed_over": "best" if handed else "last", "handed_over_step": self.best.step if handed else step,
                "last_val_loss": last_loss, "best_val_loss": min(self.best.loss, last_loss),
                **self.measure(self.final_tokens)}  # fmt: skip


def write_sample(model, tokenizer, prompt: str, tokens: int, device: str, seed: int, path: Path) -> str:
    from .model.sampling import generate

    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    g = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out = generate(model, torch.tensor([ids], device=device), tokens, temperature=0.8, top_k=50, generator=g)
    model.train()
    text = tokenizer.decode(out[0].tolist())
    atomic_write_text(path, text)
    return text
