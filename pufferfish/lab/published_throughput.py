"""The speed model against published training throughput of GPT-2 124M on the cards it names.

    python -m pufferfish.lab.published_throughput          # Markdown table (docs/benchmarks.md)

The speed model's consumer-card shares (`mfu` in conf/gpu/*.yaml) are assumed, not measured on those cards. Where
someone published what nanoGPT's GPT-2 124M step reached on such a card, the model can be checked: predict the
same shape (12 layers, 768 dims, 12 heads, vocabulary 50304, sequence 1024, nanoGPT's micro-batch) on that
card's profile and compare. nanoGPT reports MFU against the A100's 312 TFLOP/s with FLOPs per token
6N + 12 L d T (N: parameters without position embeddings), the convention of our own flops_per_token, so a
reported MFU converts to tokens/s exactly. Our model is a Llama (SwiGLU, RoPE, no biases): its ffn of 2048 gives
the three MLP matrices GPT-2's two 3072-wide ones hold, so the FLOPs per token agree to 0.1 %.

The ratio prediction / report mixes two things: the speed model's error on that card and the difference between
our step and nanoGPT's. The H200 row separates them: there nanoGPT's step was measured on the card the speed model
was fitted on, so its ratio is the step difference alone, and a card whose
ratio is lower than the H200's is predicted too slow by that factor. `implied mfu` is the profile's share scaled
by it: what the profile would need for the card's prediction to stand where the H200's does.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pufferfish.api import compose_config
from pufferfish.resolver import flops_per_token, predict_tokens_per_s
from pufferfish.resolver.hardware import own_card
from pufferfish.resolver.memory import Shape

A100_PEAK = 312e12  # nanoGPT's estimate_mfu divides by the A100's bf16 dense peak, whatever the card


@dataclass(frozen=True)
class Report:
    profile: str
    tokens_per_s: float  # what the report gives, converted
    micro_batch: int  # nanoGPT's batch_size in the reported run
    source: str
    measured_here: bool = False  # the anchor: measured on the machine the speed model was fitted on


def gpt2_small(micro_batch: int, precision: str = "bf16") -> Shape:
    """GPT-2 124M in our model's terms: nanoGPT's padded vocabulary, tied embedding, no GQA, compiled step."""
    return Shape(num_layers=12, num_dims=768, num_heads=12, num_kv_heads=12, ffn_dims=2048, vocab_size=50304,
                 seq_len=1024, micro_batch=micro_batch, precision=precision, compiled=True)  # fmt: skip


def from_nanogpt_mfu(mfu: float, micro_batch: int) -> float:
    """Tokens/s of a nanoGPT GPT-2 124M run that printed `mfu` (a share of the A100's peak)."""
    return mfu * A100_PEAK / flops_per_token(gpt2_small(micro_batch))


REPORTS = [
    Report("h200", 497_658, 16, "nanoGPT train.py measured on one H200: compiled, bf16, B16 x T1024, random tokens, "
           "torch 2.11, 2026-11-29, one run (MFU 0.43 of 989 TFLOP/s)", measured_here=True),  # fmt: skip
    Report("rtx4090", from_nanogpt_mfu(0.29, 12), 12, "github.com/karpathy/nanoGPT/issues/182 (2023-03-02): '1x 4090 "
           "GPU, I am getting 29% MFU while training GPT-2 124M' (train.py defaults: B12 x T1024, compiled, bf16, "
           "torch 2.0 nightly)"),  # fmt: skip
]


def predicted(profile: str, micro_batch: int) -> tuple[float, float]:
    """(tokens/s, the profile's mfu): the speed model for GPT-2 124M on that profile's own card."""
    hw = own_card(compose_config([f"gpu={profile}"]))
    shape = gpt2_small(micro_batch, hw.precision)
    return predict_tokens_per_s(shape, hw.peak_flops, hw.mfu, True, hw.bandwidth), hw.mfu


def rows(reports: list[Report] = REPORTS) -> list[dict]:
    out = []
    for r in reports:
        tps, mfu = predicted(r.profile, r.micro_batch)
        out.append({"profile": r.profile, "reported": r.tokens_per_s, "predicted": tps, "ratio": tps / r.tokens_per_s,
                    "mfu": mfu, "source": r.source, "anchor": r.measured_here})  # fmt: skip
    anchor = next(row["ratio"] for row in out if row["anchor"])
    for row in out:
        row["implied_mfu"] = row["mfu"] * anchor / row["ratio"]
    return out


def table(found: list[dict]) -> str:
    lines = ["| card | reported tokens/s | predicted tokens/s | predicted / reported | profile mfu | implied mfu | source |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in found:
        lines.append(f"| {r['profile']} | {r['reported']:,.0f} | {r['predicted']:,.0f} | {r['ratio']:.2f} | "
                     f"{r['mfu']:.2f} | {r['implied_mfu']:.2f} | {r['source']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(table(rows()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
