"""The lab's benchmarks run end to end on CPU (no timing is asserted: figures come from a GPU)."""

import json

from tests.conftest import ROOT


def test_throughput_benchmark_runs_on_cpu_against_transformers(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pufferfish.lab.bench_throughput", "--device", "cpu", "--tiny",
                           "--only", "baseline", "bf16", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names == ["pufferfish baseline", "pufferfish bf16", "transformers Llama eager", "transformers Llama compile"]
    assert all(r["tokens_per_s"] > 0 and r["params"] > 0 for r in rows)
    assert rows[0]["params"] == rows[2]["params"]  # the same model size as the peer: a like-for-like shape
    assert "| pufferfish baseline |" in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| pufferfish baseline |")]
    assert table and table[0].split(" | ")[2:5] == ["n/a on CPU"] * 3  # both MFUs and the GPU memory, not nan
    assert "nan" not in proc.stdout and "bf16 matmul ceiling n/a on CPU" in proc.stdout
