"""train.profile_steps: torch.profiler over a few training steps once compilation has settled.

Each rank writes profile_rank<R>.txt (wall and device time per step, then the ops by device time, or by
host time on CPU) and profile_rank<R>.json (a Chrome trace: chrome://tracing or https://ui.perfetto.dev)
into the run directory. Profiling slows the steps it covers; the run's tokens/s include them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule


def _device_metric(events) -> str:
    """The name of an op's own device time (self_cuda_time_total before torch renamed it)."""
    return "self_device_time_total" if all(hasattr(e, "self_device_time_total") for e in events[:1]) \
        else "self_cuda_time_total"  # fmt: skip


class StepProfiler:
    """Call step() after every training step and stop() when the loop ends (a no-op when steps == 0)."""

    def __init__(self, run_dir: Path, rank: int, steps: int, start: int, device: str):
        self.run_dir, self.rank, self.steps, self.start = Path(run_dir), rank, steps, start
        self.cuda = device.startswith("cuda")
        self.times: list[float] = []  # perf_counter at each step's end, from the profiler's start
        self.prof = None
        if steps <= 0:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # wait `start` steps (compilation, warm-up), one step of profiler warm-up, then `steps` recorded
        self.prof = profile(activities=activities, schedule=schedule(wait=start, warmup=1, active=steps, repeat=1),
                            on_trace_ready=self._write)  # fmt: skip
        self.prof.start()
        self.times.append(time.perf_counter())

    def step(self) -> None:
        if self.prof is None:
            return
        if self.cuda and len(self.times) in (self.start + 1, self.start + self.steps + 1):
            torch.cuda.synchronize()  # the recorded steps' wall time: from their first launch to their last kernel
        self.times.append(time.perf_counter())
        self.prof.step()
        if len(self.times) > self.start + self.steps + 1:  # written (on_trace_ready): stop recording
            self.stop()

    def stop(self) -> None:
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.stop()

    def _write(self, prof) -> None:
        first = self.start + 1  # the index in self.times where the recorded steps begin
        steps = max(1, len(self.times) - 1 - first)  # fewer than asked when the loop ended first
        wall_ms = (self.times[-1] - self.times[first]) * 1e3 / steps
        events = prof.key_averages()
        sort_by = _device_metric(events) if self.cuda else "self_cpu_time_total"
        lines = [f"rank {self.rank}: {steps} step(s) recorded after {self.start + 1}; "
                 f"wall {wall_ms:.2f} ms per step"]  # fmt: skip
        if self.cuda:  # the kernels themselves: not the ops that launched them, nor annotations (ProfilerStep#)
            kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
            busy_ms = sum(getattr(e, sort_by) for e in kernels) / 1e3 / steps
            nccl_ms = sum(getattr(e, sort_by) for e in kernels if "nccl" in e.key.lower()) / 1e3 / steps
            lines.append(f"kernels {busy_ms:.2f} ms per step ({busy_ms / wall_ms:.0%} of the wall time; below 100 %, "
                         f"the host is what the GPU waits for), of them NCCL {nccl_ms:.2f} ms (a rank waiting for "
                         f"another counts here)")  # fmt: skip
        lines.append(events.table(sort_by=sort_by, row_limit=40, max_name_column_width=70))
        (self.run_dir / f"profile_rank{self.rank}.txt").write_text("\n".join(lines) + "\n")
        prof.export_chrome_trace(str(self.run_dir / f"profile_rank{self.rank}.json"))
