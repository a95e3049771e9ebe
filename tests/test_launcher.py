"""hydra/launcher=submitit_local: a two-job multirun, each job in its own process and its own directory."""

import pytest
from omegaconf import OmegaConf

from tests.conftest import run_cli, tiny_overrides
from tests.test_wandb import of_type, read_wandb_file

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

# path-valued overrides would put slashes into the jobs' directory names (hydra.job.override_dirname)
EXCLUDE = "hydra.job.config.override_dirname.exclude_keys=[experiment,hydra.sweep.dir,data.paths,data.cache_dir]"


@pytest.mark.parametrize("launcher", ["submitit_local", "submitit_slurm"])
def test_our_launcher_configs_are_the_ones_picked(launcher):
    proc = run_cli("pufferfish.train", f"hydra/launcher={launcher}", "--cfg", "hydra", "--package", "hydra.launcher")
    assert proc.returncode == 0, proc.stderr[-2000:]
    launcher_cfg = OmegaConf.create(proc.stdout.split("\n", 1)[1])  # after the "# @package" line
    assert launcher_cfg.timeout_min == (1440 if launcher == "submitit_local" else 240)  # ours, not the plugin's 60
    assert launcher_cfg.tasks_per_node == 1 and launcher_cfg.gpus_per_node == 1
    if launcher == "submitit_slurm":
        assert launcher_cfg.max_num_timeout == 0 and launcher_cfg.signal_delay_s == 120


def test_two_job_submitit_local_multirun(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tmp_path / "unused", cache_dir) if not o.startswith("run_dir=")]
    proc = run_cli("pufferfish.train", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", EXCLUDE,
                   *overrides, "train.max_steps=5", "train.sample_tokens=0", "logger=wandb", "optim.lr=1e-3,3e-3",
                   env={"OMP_NUM_THREADS": "1"})  # the two jobs run at once: one thread each on a small machine  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    assert [d.name.split("_", 1)[0] for d in jobs] == ["0", "1"], jobs
    lrs = set()
    for job in jobs:  # each job's results in its own directory
        for name in ["config.yaml", "plan.json", "metrics.jsonl", "summary.json", "checkpoints/latest"]:
            assert (job / name).exists(), (job.name, name)
        assert OmegaConf.load(job / "summary.json").finished
        lrs.add(OmegaConf.load(job / "config.yaml").optim.lr)
        (run,) = job.glob("wandb/offline-run-*")  # one W&B run per job, finished inside it
        records = read_wandb_file(next(run.glob("run-*.wandb")))
        meta = of_type(records, "run")[0]
        assert meta.run_group == "sweep" and meta.display_name == job.name.split("_", 1)[1]
        assert of_type(records, "exit")
    assert lrs == {1e-3, 3e-3}
    assert len([d for d in (sweep / ".submitit").iterdir() if any(d.glob("*_log.out"))]) == 2  # two processes
