"""The lab's figures: one row of panels, drawn without a display, saved as PNG."""

from __future__ import annotations

from pathlib import Path


def panels(n: int):
    """(figure, its n axes side by side), on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    return fig, list(axes[0])


def save(fig, path: Path) -> None:
    """Legends on every panel, then the PNG."""
    for ax in fig.axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
