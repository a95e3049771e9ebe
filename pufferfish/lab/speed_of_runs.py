"""The speed model against the steady speed of time-to-loss runs on a GPU: how far a card's share of its peak is off.

    python -m pufferfish.lab.speed_of_runs [FILE.jsonl ...] [--gpu h100]   # default: the committed H100 rows

A run's steady tokens/s is its tokens between its first and last evaluations over the seconds between them (the
evaluations in between count, as they do in its budget, so it is a little under the steps' own speed; start-up
and compilation fall before the first). The prediction is the `predicted_tokens_per_s` of the plan the resolver
makes for that run today (its shape, batch, recipe as the row records it (recipe_of) and budget on the card's
profile, planned here from the profile's numbers, not this machine's), so rows made before a change of the step or of the compile
decision compare that change too. The median of measured over predicted, times the profile's share (`mfu`), is
the share the runs suggest.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from .fit_compile_time import MEASURED, shape_of
from .time_to_loss import PEER


def steady_tokens_per_s(curve: list, batch_tokens: int) -> float:
    """Tokens a second between a run's first and last evaluations (curve rows: seconds, loss, step)."""
    (t0, _, s0), (t1, _, s1) = curve[0], curve[-1]
    if t1 <= t0 or s1 <= s0:
        raise ValueError(f"a curve from step {s0} at {t0} s to step {s1} at {t1} s has no steady stretch")
    return (s1 - s0) * batch_tokens / (t1 - t0)


def recipe_of(row: dict) -> list[str]:
    """The overrides that plan a row's recipe as it ran, whatever today's defaults: its optimizer, QK-norm and
    sequence length (a row without `seq_len` ran quick_dev's 512 of its time), which the speed depends on."""
    return [f"optim.name={row['optimizer']['name']}", f"model.qk_norm={str(row.get('qk_norm', False)).lower()}",
            f"model.seq_len={row.get('seq_len', 512)}"]  # fmt: skip


def planned(row: dict, gpu: str):
    """The plan the resolver makes today for the run of `row` on `gpu`'s profile."""
    from pufferfish.api import compose_config
    from pufferfish.resolver import make_plan
    from pufferfish.resolver.hardware import own_card

    layers, dims = shape_of(row)
    cfg = compose_config([f"gpu={gpu}", "mode=quick_dev", f"mode.target_hours={row['budget_s'] / 3600}",
                          f"model.num_layers={layers}", f"model.num_dims={dims}",
                          f"train.batch_tokens={row['batch_tokens']}", *recipe_of(row)])  # fmt: skip
    return make_plan(cfg, own_card(cfg), 8192, 10**9)  # a corpus that never binds: the speed alone


def rows_of(path: Path, gpu: str) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["system"] == PEER or len(row.get("curve", [])) < 2 or not row.get("batch_tokens"):
            continue
        plan = planned(row, gpu)
        measured = steady_tokens_per_s(row["curve"], row["batch_tokens"])
        out.append({"file": path.name, "system": row["system"], "shape": "{} x {}".format(*shape_of(row)),
                    "batch": row["batch_tokens"], "compiled": plan.compile, "measured": measured,
                    "predicted": plan.predicted_tokens_per_s, "ratio": measured / plan.predicted_tokens_per_s})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, default=MEASURED)
    ap.add_argument("--gpu", default="h100", help="the profile the runs were planned for")
    args = ap.parse_args()
    from pufferfish.api import compose_config

    share = float(compose_config([f"gpu={args.gpu}"]).gpu.mfu)
    rows = [r for f in args.files for r in rows_of(f, args.gpu)]
    if not rows:
        raise SystemExit("speed_of_runs: no Pufferfish run with a curve and a batch in " + ", ".join(map(str, args.files)))
    print("| file | system | shape | tokens a step | compiled (plan today) | steady tokens/s | predicted | measured / "
          "predicted |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['file']} | {r['system']} | {r['shape']} | {r['batch']:,} | {'yes' if r['compiled'] else 'no'} | "
              f"{r['measured']:,.0f} | {r['predicted']:,.0f} | {r['ratio']:.2f} |")  # fmt: skip
    median = statistics.median(r["ratio"] for r in rows)
    print(f"\nmedian measured / predicted {median:.2f} over {len(rows)} runs: the profile's share {share:g} "
          f"would be {share * median:.2f}")


if __name__ == "__main__":
    main()
