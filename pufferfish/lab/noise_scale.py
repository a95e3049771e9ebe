"""The gradient noise scale of a run's model at its checkpoints: about the batch (tokens a step) above which a
larger batch stops buying progress per step (McCandlish et al. 2018, "An empirical model of large-batch
training"). At a batch B a run needs about E_min (1 + B / B_noise) tokens to reach a loss it could reach with
E_min at the smallest batches, and S_min (1 + B_noise / B) steps: a plan's batch far above B_noise spends tokens,
one far below spends steps.

    python -m pufferfish.lab.noise_scale RUN_DIR [--micro-batches 8] [--groups 4] [--sequences 4] [--steps all]

From K micro-batch gradients G_i of b tokens each and their mean G (K b tokens), each group estimates (the
paper's unbiased estimators, appendix A)
    |G_true|^2 ~ (K b |G|^2 - b mean_i |G_i|^2) / (K b - b)
    tr(Sigma)  ~ (mean_i |G_i|^2 - |G|^2) / (1/b - 1/(K b))
and B_noise = tr(Sigma) / |G_true|^2, in tokens, each estimate averaged over the groups before dividing (one
group's ratio is biased and noisy); where the estimated |G_true|^2 is not above zero (the noise hides the
gradient from so few groups) B_noise is inf: measure more groups. The micro-batches are windows of the run's training tokens drawn at random
(a fixed seed), read through the run's own tokenizer's prepared corpus; the loss is the training loss the step
takes, in fp32 (bf16 autocast on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pufferfish.checkpoint import checkpoint_files, step_of
from pufferfish.data import load_prepared
from pufferfish.data.tokens import cache_root
from pufferfish.errors import ConfigError, exit_on_user_error
from pufferfish.generate import load_model
from pufferfish.loss import lm_loss


@dataclass
class NoiseScale:
    step: int
    loss: float  # mean training loss over the micro-batches
    grad_sq: float  # |G_true|^2, estimated
    trace: float  # tr(Sigma) per token, estimated
    tokens: float  # B_noise = trace / grad_sq, in tokens

    def row(self) -> str:
        return f"| {self.step:,} | {self.loss:.3f} | {self.grad_sq:.3g} | {self.trace:.3g} | {self.tokens:,.0f} |"


def estimate(small_sq: list[float], big_sq: list[float], b_small: float, b_big: float) -> tuple[float, float, float]:
    """|G_true|^2, tr(Sigma) and B_noise from each group's mean squared norm of its micro-batch gradients
    (`small_sq`, b_small tokens each) and the squared norm of their mean (`big_sq`, b_big tokens)."""
    if not b_big > b_small > 0 or len(small_sq) != len(big_sq) or not small_sq:
        raise ValueError(f"need b_big > b_small > 0 and one small and one big norm per group; got b_small={b_small}, "
                         f"b_big={b_big}, {len(small_sq)} and {len(big_sq)} norms")  # fmt: skip
    small, big = float(np.mean(small_sq)), float(np.mean(big_sq))
    grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1 / b_small - 1 / b_big)
    return grad_sq, trace, trace / grad_sq if grad_sq > 0 else float("inf")


def prepared_for(run: Path):
    """The prepared corpus the run read: the cache entry whose tokenizer is the run's own (the entry's name
    follows the corpus cap, which the run's budget may have chosen, so the tokenizer is the sure match)."""
    own = (run / "tokenizer.model").read_bytes()
    data_cfg = OmegaConf.load(run / "config.yaml").data
    for meta in sorted(cache_root(data_cfg.cache_dir).glob("*/meta.json")):
        if (meta.parent / "tokenizer.model").is_file() and (meta.parent / "tokenizer.model").read_bytes() == own:
            return load_prepared(meta.parent)
    raise ConfigError(f"no prepared corpus under {cache_root(data_cfg.cache_dir)} has {run}'s tokenizer; prepare it "
                      f"again on this machine (train with the run's config.yaml, dry_run=true) and retry")  # fmt: skip


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def measure(model, tokens: np.ndarray, seq_len: int, sequences: int, micro_batches: int, groups: int,
            rng: np.random.Generator, device: str) -> tuple[float, list[float], list[float]]:  # fmt: skip
    """The mean loss and, per group, the mean |G_i|^2 of its micro-batches and |mean G_i|^2."""
    small_sq, big_sq, losses = [], [], []
    model.train()
    for _ in range(groups):
        total, norms = None, []
        for _ in range(micro_batches):
            starts = rng.integers(0, len(tokens) - seq_len - 1, size=sequences)
            rows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
            x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
                loss = lm_loss(model, x, y, chunked=True)
            loss.backward()
            g = flat_grad(model)
            norms.append(float(g.square().sum()))
            total = g if total is None else total.add_(g)
            losses.append(float(loss.detach()))
        small_sq.append(float(np.mean(norms)))
        big_sq.append(float(total.div_(micro_batches).square().sum()))
    model.zero_grad(set_to_none=True)
    return float(np.mean(losses)), small_sq, big_sq


def noise_scales(run: Path, steps: str = "all", sequences: int = 4, micro_batches: int = 8, groups: int = 4,
                 device: str = "auto", seed: int = 0) -> tuple[list[NoiseScale], dict]:  # fmt: skip
    """B_noise at the run's checkpoints (`steps`: all, last, or comma-separated steps), and its plan."""
    if micro_batches < 2 or groups < 1 or sequences < 1:
        raise ConfigError(f"--micro-batches={micro_batches}, --groups={groups}, --sequences={sequences}; allowed: at "
                          f"least 2 micro-batches (the estimate compares them with their mean), 1 group, 1 sequence")  # fmt: skip
    for needed in ("config.yaml", "plan.json", "tokenizer.model", "checkpoints"):
        if not (run / needed).exists():
            raise ConfigError(f"{run} has no {needed}: name a run directory that trained (with checkpoints)")
    plan = json.loads((run / "plan.json").read_text())
    wanted = {f: step_of(f) for f in checkpoint_files(run / "checkpoints")}
    if not wanted:
        raise ConfigError(f"{run}/checkpoints holds no step_*.pt: name a run directory that trained (with checkpoints)")
    if steps == "last":
        wanted = dict([max(wanted.items(), key=lambda kv: kv[1])])
    elif steps != "all":
        if not all(s.strip().isdigit() for s in steps.split(",")):
            raise ConfigError(f"--steps={steps!r}; allowed: all, last, or checkpoint steps, comma-separated (e.g. 0,100)")
        asked = {int(s) for s in steps.split(",")}
        missing = sorted(asked - set(wanted.values()))
        if missing:
            raise ConfigError(f"--steps has {missing}, which {run}/checkpoints does not; it has "
                              f"{sorted(wanted.values())}")  # fmt: skip
        wanted = {f: s for f, s in wanted.items() if s in asked}
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    data = prepared_for(run)
    tokens = np.memmap(data.train_path, dtype=np.dtype(data.dtype), mode="r")
    seq_len = int(plan["seq_len"])
    out = []
    for path, step in sorted(wanted.items(), key=lambda kv: kv[1]):
        model, _ = load_model(path, device)
        rng = np.random.default_rng(seed)  # the same micro-batches at every checkpoint
        loss, small_sq, big_sq = measure(model, tokens, seq_len, sequences, micro_batches, groups, rng, device)
        b = sequences * seq_len
        out.append(NoiseScale(step, loss, *estimate(small_sq, big_sq, b, micro_batches * b)))
    return out, plan


@exit_on_user_error
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run directory with checkpoints")
    ap.add_argument("--steps", default="all", help="all, last, or the checkpoints' steps, comma-separated")
    ap.add_argument("--sequences", type=int, default=4, help="sequences a micro-batch (of the run's seq_len)")
    ap.add_argument("--micro-batches", type=int, default=8, help="micro-batches a group (K)")
    ap.add_argument("--groups", type=int, default=4, help="groups whose estimates are averaged")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    rows, plan = noise_scales(args.run, args.steps, args.sequences, args.micro_batches, args.groups, args.device,
                              args.seed)  # fmt: skip
    print(f"{args.run}: the plan's batch {plan['batch_tokens']:,} tokens a step, {plan['steps']:,} steps; "
          f"micro-batches of {args.sequences} x {plan['seq_len']} tokens, {args.micro_batches} a group, {args.groups} groups")
    print("\n| step | train loss | gradient norm^2 | tr(Sigma) | B_noise (tokens) |\n|---|---|---|---|---|")
    print("\n".join(r.row() for r in rows))
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run), "batch_tokens": plan["batch_tokens"],
                                        "rows": [asdict(r) for r in rows]}, indent=1))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
