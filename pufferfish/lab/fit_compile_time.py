"""The seconds torch.compile adds to a run's start, by depth: fitted from time-to-loss runs on a GPU.

    python -m pufferfish.lab.fit_compile_time [FILE.jsonl ...]   # default: the committed H100 time-to-loss rows

A run's start-up (pufferfish.lab.time_to_loss.startup: its first evaluation's seconds less its steps at its steady
seconds a step) is mostly the compilation of its forward and loss. Only a cold compile counts: in each results
file (runs in the order they ran) the first Pufferfish run of each graph (layers x dims, QK-norm or not; the
optimizer is not compiled, so Muon shares the default's graph). A least-squares line in the number of layers
(Inductor compiles the unrolled model, so its work grows with depth) gives SpeedConstants.compile_base_s and
compile_layer_s in pufferfish/resolver/speed.py, which the planner weighs against the eager step's slower steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .time_to_loss import PEER, PLAN, ROOT, startup

MEASURED = sorted((ROOT / "docs" / "measurements").glob("*/time_to_loss_h100_*.jsonl"))


def shape_of(row: dict, vocab: int = 8192) -> tuple[int, int]:
    """(layers, dims) of a run: its fixed size, its recorded shape, or the planned shape whose parameter count is
    the row's (rows of `--sizes plan` made before the shape was recorded)."""
    if row["size"] != PLAN:
        layers, dims = row["size"].split("x")
        return int(layers), int(dims)
    if "layers" in row:
        return row["layers"], row["dims"]
    from pufferfish.api import compose_config
    from pufferfish.resolver.hardware import own_card
    from pufferfish.resolver.memory import count_params
    from pufferfish.resolver.shapes import memory_shape, model_dict

    cfg = compose_config(["gpu=h100", "mode=quick_dev", "optim.name=adamw"])  # parameters only: either optimizer
    hw = own_card(cfg)
    for layers in range(1, 49):
        for dims in range(64, 2049, 64):
            mc = model_dict(cfg, layers, dims, vocab, 512)
            if count_params(memory_shape(mc, cfg, hw, 1, False)) == row["params"]:
                return layers, dims
    raise SystemExit(f"fit_compile_time: no shape of {row['params']:,} parameters (vocab {vocab}); record its shape")


def cold_rows(path: Path) -> list[dict]:
    """The runs of one results file that compiled their graph first on its machine, with layers and start-up."""
    seen, out = set(), []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["system"] == PEER or len(row.get("curve", [])) < 2:
            continue
        layers, dims = shape_of(row)
        graph = (layers, dims, bool(row.get("qk_norm")))
        if graph not in seen:
            seen.add(graph)
            out.append({"file": path.name, "system": row["system"], "layers": layers, "dims": dims,
                        "qk_norm": graph[2], "startup_s": startup(row["curve"])})  # fmt: skip
    return out


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, default=MEASURED)
    args = ap.parse_args()
    rows = [r for f in args.files for r in cold_rows(f)]
    if len(rows) < 2:
        raise SystemExit("fit_compile_time: fewer than two cold compiles in " + ", ".join(map(str, args.files)))
    a, b = fit_line([r["layers"] for r in rows], [r["startup_s"] for r in rows])
    print("| file | system | shape | qk_norm | start-up s | fitted s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['system']} | {r['layers']} x {r['dims']} | {r['qk_norm']} | {r['startup_s']:.1f} | "
              f"{a + b * r['layers']:.1f} |")  # fmt: skip
    print(f"\ncompile_base_s = {a:.1f}, compile_layer_s = {b:.2f} ({len(rows)} cold compiles)")


if __name__ == "__main__":
    main()
