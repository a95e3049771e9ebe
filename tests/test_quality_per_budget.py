"""The quality table: the plan against the best of the oracle's grid (whatever parts it ran in) and nanoGPT."""

from __future__ import annotations

import json

from pufferfish.lab import quality_per_budget as qpb


def row(system: str, loss: float, **extra) -> dict:
    return {"corpus": "shakespeare", "budget_s": 108.0, "system": system, "val_loss": loss, "val_bpb": loss / 3,
            "best_val_loss": loss, "last_val_loss": loss + 0.2, "stopped_by": "schedule", "shape": "6 x 384",
            "wall_s": 140.0, "curve": [(30.0, loss + 1.0), (120.0, loss)], **extra}  # fmt: skip


def test_the_plan_is_set_against_the_best_oracle_job_of_every_part_and_against_nanogpt(tmp_path):
    rows = [row("plan", 4.20),
            row("oracle", 4.30, job="w0.5/0"), row("oracle", 4.10, job="w0.5/1"),  # one part of the grid (--oracle-widths 0.5)
            row("oracle", 4.00, job="w1/0"), row("oracle", 4.50, job="w1/1"),  # another part, appended by a later call
            row("nanogpt", 4.41)]  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = qpb.report(tmp_path).splitlines()
    plan, oracle, nano = (next(line for line in table[2:] if f"| {name}" in line) for name in ("plan", "oracle", "nanogpt"))
    assert "| +5.0% | -0.210 |" in plan  # 4.20 / 4.00 - 1, and 4.20 - 4.41
    assert "oracle best of 4 (w1/0) | 4.000 |" in oracle
    assert "| 4.410 |" in nano
    assert (tmp_path / "quality_per_budget.png").stat().st_size > 10_000


def test_the_oracle_grid_splits_by_width_into_parts_that_together_make_the_whole():
    """Each part is one multirun of its widths x 2 learning rates x 2 batches; the parts cover the full grid."""
    plan = {"shape": "6 x 384", "lr": 1e-3, "batch_tokens": 65536}
    whole = qpb.oracle_grid(plan)
    assert whole == ["model.num_dims=192,256,384,576,768", "optim.lr=1.000e-03,2.000e-03",
                     "train.batch_tokens=65536,16384", "optim.name=adamw"]  # 384 x (0.5, 0.75, 1, 1.5, 2), to 64  # fmt: skip
    parts = [qpb.oracle_grid(plan, factors) for factors in [(0.5, 0.75), (1.0,), (1.5, 2.0)]]
    assert ",".join(p[0].split("=")[1] for p in parts) == whole[0].split("=")[1]
    assert all(p[1:] == whole[1:] for p in parts)
    muon = qpb.oracle_grid({**plan, "optimizer": {"name": "muon", "muon_lr": 0.02}})  # the rate of most of the model
    assert muon[1] == "optim.muon_lr=2.000e-02,4.000e-02" and (muon[0], muon[2]) == (whole[0], whole[2])
    assert muon[3] == "optim.name=muon"  # the plan's optimizer in every job, not optim.name=auto's choice there
