"""The card the jobs will see, asked of nvidia-smi: this process never starts CUDA, which would take memory
from the jobs."""

from __future__ import annotations

import os
import subprocess
import sys

from pufferfish.resolver.hardware import GIB

ASSUMED_CARD_GIB = 140.4  # an H200's memory as torch reports it: --list's card when no GPU is here


def gpu_ids(count: int | None) -> list[str]:
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        ids = [i.strip() for i in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if i.strip()]
    else:
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            ids = [str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]
        except (OSError, subprocess.SubprocessError):
            ids = []
    return ids[:count] if count else ids


def visible_gpus(count: int | None) -> list[str]:
    ids = gpu_ids(count)
    if not ids:
        sys.exit("no GPU is visible; use --device cpu --profiles cpu to check the machinery on the CPU "
                 "(or --list to see the grouping for an assumed card)")  # fmt: skip
    return ids


def card_info(card: str) -> tuple[str, float]:
    """The card's name and memory (GiB), asked of nvidia-smi: a CUDA context here would take memory from the jobs."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits", "-i", card]
    try:
        name, mib = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.strip() \
            .splitlines()[0].rsplit(",", 1)  # fmt: skip
        return name.strip(), float(mib) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        sys.exit("nvidia-smi could not tell the GPU's name and memory; pass --gpu-mem-gib")


def planning_card(args) -> tuple[tuple[str, int] | None, str]:
    """The card the jobs will see, as nvidia-smi describes it (no CUDA here), or --list's assumed card when
    no GPU is visible; None on --device cpu. Returns (card, what it is, in words)."""
    if args.device == "cpu":
        return None, "the CPU (gpu=cpu, no emulation)"
    ids = gpu_ids(args.gpus)
    if ids:
        name, total_gib = card_info(ids[0])
        total_gib = args.gpu_mem_gib or total_gib
        return (name, int(total_gib * GIB)), f"GPU {ids[0]} here: {name}, {total_gib:.1f} GiB"
    total_gib = args.gpu_mem_gib or ASSUMED_CARD_GIB
    return (f"assumed card of {total_gib:.1f} GiB", int(total_gib * GIB)), (
        f"an assumed card of {total_gib:.1f} GiB: no GPU is visible here, so the profiles' Hardware is built for a "
        f"card of that size (--gpu-mem-gib; default {ASSUMED_CARD_GIB}, an H200's)")
