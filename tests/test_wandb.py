"""logger=wandb: an offline W&B run in the run directory that mirrors metrics.jsonl, read back from its file.

wandb 0.31 ships no public reader of a run's `.wandb` file (the Python datastore is gone; `wandb sync` has
no --view), so read_wandb_file below reads the format itself: LevelDB-log framing (32 KiB blocks of
checksummed chunks) around `wandb.proto.wandb_internal_pb2.Record` messages, unchanged since wandb 0.10.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pufferfish.errors import ConfigError
from pufferfish.loggers import has_wandb_key, wandb_mode
from pufferfish.runlog import read_metrics
from tests.conftest import ROOT, compose, tiny_overrides

pytest.importorskip("wandb")

BLOCK, CHUNK_HEADER = 32768, 7  # LevelDB log: crc32 (4), length (2), type (1); FULL=1 FIRST=2 MIDDLE=3 LAST=4


def read_wandb_file(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} does not start with the W&B header; has the file format changed?"
    records, pos, pending = [], 7, b""  # the 7-byte file header: ":W&B", magic 0xBEE1, version
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        pending += data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def items(updates) -> dict:
    return {u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in updates}


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*"), key=lambda p: p.stat().st_mtime)


def expected_rows(metrics: list[dict]) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for r in metrics:  # W&B merges what is logged at one step into one row
        rows.setdefault(r["step"], {}).update(
            {k: v for k, v in r.items() if k not in ("kind", "step", "final") and isinstance(v, (int, float))
             and not isinstance(v, bool)})  # fmt: skip
    return {step: row for step, row in rows.items() if row}


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # not the developer's real key


def test_offline_run_mirrors_metrics_and_resumes_as_the_same_run(tmp_path, cache_dir, no_wandb_key):
    from pufferfish.train import train

    run = tmp_path / "run"
    common = ("logger=wandb", "train.max_steps=6", "train.log_interval=2", "train.eval_interval=3")
    first = train(compose(*tiny_overrides(run, cache_dir, *common, "train.stop_at_step=3")))
    assert not first["finished"]
    train(compose(*tiny_overrides(run, cache_dir, *common)))
    runs = offline_runs(run)
    assert len(runs) == 2, runs  # one per process that trained; `wandb sync` joins them by their id
    records = [read_wandb_file(next(d.glob("run-*.wandb"))) for d in runs]
    ids = {of_type(r, "run")[0].run_id for r in records}
    assert ids == {(run / "wandb_run_id").read_text().strip()}

    meta = of_type(records[1], "run")[0]
    assert meta.display_name == "run" and meta.run_group == "" and meta.project == "pufferfish"
    assert {"gpu=cpu", "mode=ultra_fast", "data=text_files", "moe=none"} <= set(meta.tags)
    config = items(meta.config.update)
    plan = json.loads((run / "plan.json").read_text())
    assert config["plan"]["params"] == plan["params"] and config["train"]["max_steps"] == 6

    # every number of metrics.jsonl, at its own step (the first process logged steps 0-3, the second 4-6)
    metrics = read_metrics(run / "metrics.jsonl")
    logged = {h.step.num: items(h.item) for r in records for h in of_type(r, "history")}
    expected = expected_rows(metrics)
    assert sorted(logged) == sorted(expected)
    for step, row in expected.items():
        assert {k: logged[step][k] for k in row} == pytest.approx(row), step
    summary = {}
    for s in of_type(records[1], "summary"):
        summary.update(items(s.update))
    assert summary["stopped_by"] == "schedule" and summary["val_loss"] == pytest.approx(metrics[-1]["val_loss"])
    assert all(of_type(r, "exit") for r in records)  # each run was finished inside its job


def test_a_wandb_run_prints_no_history_or_summary_of_its_own(tmp_path, cache_dir, no_wandb_key):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pufferfish.train", *tiny_overrides(run, cache_dir, "logger=wandb",
                           "train.max_steps=4"), f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert offline_runs(run) and "Run history:" not in said and "Run summary:" not in said, said[-3000:]
    lines = [line for line in said.splitlines() if line.startswith("wandb:")]
    assert len(lines) <= 5, lines  # where the run is kept and how to sync it, not ~40 lines of sparklines
    assert any(line.endswith(f"wandb sync {offline_runs(run)[0]}") for line in lines)  # where the run waits


def test_mode_follows_the_key_and_wandb_mode(monkeypatch, tmp_path, no_wandb_key):
    assert not has_wandb_key() and wandb_mode("auto")[0] == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert has_wandb_key() and wandb_mode("auto")[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto")[0] is None  # wandb reads WANDB_MODE itself
    assert wandb_mode("disabled")[0] == "disabled"
    with pytest.raises(ConfigError, match="logger.wandb_mode='cloud'"):
        wandb_mode("cloud")


def test_wandb_is_imported_only_when_chosen():
    code = "import sys, pufferfish.train, pufferfish.loggers; sys.exit('wandb' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0
