"""What each consumer and datacentre card runs, and the speed model's prediction for it (README's table).

    python -m pufferfish.lab.card_table                  # Markdown: every gpu profile's step and predicted tokens/s
    python -m pufferfish.lab.card_table --modes standard --profiles gtx1060 rtx3060

Each profile is planned as on its own card (pufferfish.resolver's hardware_on and make_plan, with the default
optimizations=all), described without a GPU, for a large corpus: nothing runs, every figure is predicted.
"""

from __future__ import annotations

import argparse
import sys

from pufferfish.api import compose_config
from pufferfish.resolver import make_plan
from pufferfish.resolver.capabilities import architecture
from pufferfish.resolver.hardware import own_card

PROFILES = "gtx1060 gtx1650 rtx2060 rtx3060 rtx4060 rtx3090 rtx4090 a100_40gb a100_80gb h100 h200".split()
VOCAB, CORPUS_TOKENS = 32000, 10**10  # a large corpus: the plans are time-bound, as on real data
# one shape on every card, so the speeds compare: GPT-2 small's depth and width (124M with its vocabulary)
REFERENCE = ["model.num_layers=12", "model.num_dims=768", "model.seq_len=1024"]


def rows(profiles: list[str], modes: list[str]) -> list[str]:
    lines = ["| card | architecture | precision | compile | attention | "
             + " | ".join(f"{m}: plan, tokens/s" for m in modes) + " | 12 x 768, seq 1024: tokens/s |",
             "|" + "---|" * (6 + len(modes))]  # fmt: skip
    for profile in profiles:
        speeds = []
        for overrides in [[f"mode={mode}"] for mode in modes] + [["mode=standard", *REFERENCE]]:
            cfg = compose_config([f"gpu={profile}", *overrides])
            plan = make_plan(cfg, own_card(cfg), VOCAB, CORPUS_TOKENS)
            m, ckpt = plan.model, ", checkpointed" if plan.grad_ckpt else ""
            shape = "" if overrides[1:] else f"{m['num_layers']} x {m['num_dims']}{ckpt}: "
            speeds.append(f"{shape}{plan.predicted_tokens_per_s / 1e3:,.0f}k")
        arch = architecture(float(cfg.gpu.compute_capability))
        lines.append(f"| {profile} | {arch.name} {cfg.gpu.compute_capability} | {plan.precision} | "
                     f"{'compiled' if plan.compile else 'eager'} | {plan.attention_kernel} | " + " | ".join(speeds) + " |")
    return lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profiles", nargs="+", default=PROFILES)
    p.add_argument("--modes", nargs="+", default=["quick_dev", "standard"])
    args = p.parse_args(argv)
    print("\n".join(rows(args.profiles, args.modes)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
