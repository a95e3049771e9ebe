"""Bad input never crashes the tool: one clear message naming the value, a non-zero exit, no traceback.

The property tests run in-process on the path the CLI takes (compose the real config, then train(cfg));
a handful of real CLI runs check what the user sees: the exit status and stderr.
"""

import itertools
import os
import re
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra.errors import HydraException
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from pufferfish.errors import PufferfishError
from pufferfish.train import train
from pufferfish.validate import GROUPS, RULES, check_overrides
from tests.conftest import ROOT, compose, english_file, tiny_overrides

CLEAR = (PufferfishError, HydraException, OmegaConfBaseException)  # each printed as a message by the CLI
# PUFFERFISH_FUZZ_EXAMPLES=1000 for a longer hunt than the default suite's
FAST = settings(max_examples=int(os.environ.get("PUFFERFISH_FUZZ_EXAMPLES", 40)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def quick_cpu_probe():
    """The CPU speed probe (0.3 s a plan) is not under test here; a fixed rate keeps each example fast."""
    import pufferfish.resolver.hardware as hardware

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hardware, "cpu_matmul_flops", lambda *a, **k: 50e9)
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_dir):
    """Overrides of a valid dry run; each example gets its own run directory."""
    root, count = tmp_path_factory.mktemp("bad-input"), itertools.count()
    train(compose(*tiny_overrides(root / "warm", cache_dir, "dry_run=true")))  # prepare the data once
    return lambda: tiny_overrides(root / f"run{next(count)}", cache_dir, "dry_run=true")


def outcome(overrides: list[str]):
    """None when the dry run succeeds, else the exception the CLI would print; anything else escapes."""
    try:
        check_overrides(overrides)
        train(compose(*overrides))
    except CLEAR as e:
        return e
    return None


def hydra_value(v) -> str:
    if isinstance(v, float):
        return repr(v)  # nan, inf, -inf and 1e+30 are Hydra floats
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(map(hydra_value, v)) + "]"
    return str(v)


words = st.text(string.ascii_lowercase, min_size=1, max_size=8).filter(
    lambda w: w not in ("true", "false", "null", "nan", "inf", "yes", "no", "on", "off")
)
values = st.one_of(
    st.integers(-(10**15), 10**15),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.booleans(),
    st.none(),
    words,
    st.lists(st.integers(-5, 5), max_size=3),
)


# ---------------------------------------------------------------- config overrides


@st.composite
def out_of_range(draw):
    key = draw(st.sampled_from(sorted(RULES)))
    ok, _ = RULES[key]
    value = draw(values)
    assume(value is not None and not ok(value))
    return key, f"{key}={hydra_value(value)}"


@st.composite
def bad_override(draw):
    kind = draw(st.sampled_from(["range", "type", "unknown", "kv_heads", "budget", "steps"]))
    if kind == "range":
        return draw(out_of_range())
    if kind == "type":  # text or a list where a number goes
        key = draw(st.sampled_from(["model.num_layers", "train.log_interval", "train.max_steps", "optim.lr",
                                    "mode.target_hours", "train.seed", "model.num_kv_heads"]))  # fmt: skip
        return key, f"{key}={draw(st.one_of(words, st.just('[1,2]'), st.just('1.5x')))}"
    if kind == "unknown":
        where = draw(st.sampled_from(["", "train.", "model.", "optim.", "data."]))
        key = where + draw(words.map(lambda w: "x_" + w))
        return key, f"{draw(st.sampled_from(['', '+']))}{key}={draw(st.integers(0, 9))}"
    if kind == "kv_heads":
        heads = draw(st.integers(2, 64))
        kv = draw(st.integers(1, heads).filter(lambda k: heads % k))
        return "model.num_kv_heads", [f"model.num_heads={heads}", f"model.num_kv_heads={kv}"]
    if kind == "budget":
        hours = draw(st.one_of(st.floats(max_value=0), st.floats(min_value=720.001), st.just(float("nan"))))
        return "mode.target_hours", f"mode.target_hours={hydra_value(hours)}"
    key = draw(st.sampled_from(["train.max_steps", "train.stop_at_step", "train.log_interval", "train.eval_interval"]))
    return key, f"{key}={draw(st.integers(-(10**9), 0))}"


@FAST
@given(case=bad_override())
def test_a_bad_config_value_is_one_clear_error_naming_the_key(base, case):
    key, override = case
    error = outcome([*base(), *([override] if isinstance(override, str) else override)])
    assert error is not None, f"{override} was accepted"
    assert key in str(error) or key.rsplit(".", 1)[-1] in str(error), str(error)


LEAVES = [k for k in ("gpu.vram_gb gpu.compute_capability gpu.tflops_fp32 gpu.tflops_tensor gpu.bandwidth_gbs gpu.bf16 "
                      "gpu.fast_fp16 gpu.mfu gpu.emulate mode.target_hours mode.min_hours mode.max_hours "
                      "mode.min_layers mode.max_layers mode.min_dims mode.max_dims mode.min_data_fraction "
                      "mode.max_data_fraction mode.seq_len model.num_layers model.num_dims model.num_heads "
                      "model.num_kv_heads model.vocab_size model.ffn_dims model.seq_len model.rope_theta "
                      "model.norm_eps model.init_std model.qk_norm attention.heads_per_kv_head attention.head_dim "
                      "attention.sdpa_backend moe.enabled moe.num_experts moe.active_experts moe.every_n_layers "
                      "moe.first_dense_layers moe.score_func moe.expert_ffn_dims optimizations.precision "
                      "optimizations.grad_ckpt optimizations.compile optimizations.compile_backend optimizations.chunked_loss "
                      "optimizations.loss_chunk_tokens optimizations.prefetch_batches optimizations.ddp_graphs logger.wandb_mode optim.name optim.lr optim.muon_lr "
                      "optim.min_lr_ratio optim.schedule optim.warmup_frac optim.decay_frac optim.weight_decay "
                      "optim.beta1 optim.beta2 optim.grad_clip train.seed train.batch_tokens train.micro_batch "
                      "train.max_steps train.stop_at_step train.eval_interval train.eval_tokens train.log_interval "
                      "train.ckpt_interval_s train.keep_checkpoints train.max_bad_steps train.sample_tokens "
                      "train.device job").split()]  # fmt: skip


@FAST
@given(key=st.sampled_from(LEAVES), value=values)
def test_any_single_override_plans_or_fails_with_a_message_never_a_traceback(base, key, value):
    outcome([*base(), f"{key}={hydra_value(value)}"])  # an exception outside CLEAR fails the test


@pytest.mark.parametrize("group", sorted(set(GROUPS) - {"experiment"}))
def test_a_config_group_set_to_null_is_a_message_not_hydras_traceback(group):
    with pytest.raises(PufferfishError, match=f"{group}=null: a config group needs an option name"):
        check_overrides([f"{group}=null"])


# ---------------------------------------------------------------- data


CONTENTS = {
    "empty": st.just(b""),
    "blank": st.sampled_from([b"\n", b"   \n\t\n", b"\r\n\r\n"]),
    "binary": st.binary(min_size=1, max_size=2000).map(lambda b: b + b"\x00"),
    "invalid_utf8": st.text(string.ascii_letters + " \n", max_size=500).map(lambda t: t.encode() + b"\xff\xfe"),
    "text": st.lists(st.text(string.ascii_letters + string.digits + " .,;'!?\u00e9\u4e2d", max_size=80),
                     min_size=1, max_size=400).map(lambda lines: "\n".join(lines).encode()),  # fmt: skip
    "english": st.integers(30, 300).map(lambda n: english_file().read_bytes()[: n * 1000]),
}
kinds = st.sampled_from([*sorted(CONTENTS), "english", "english"])  # a fair share of runs that train
files = st.lists(st.tuples(kinds, st.sampled_from([".txt", ".md", ".py", ".bin", ""])), min_size=0, max_size=3)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=files, data=st.data(), give=st.sampled_from(["folder", "files"]))
def test_any_text_folder_trains_or_is_refused_with_one_message(spec, data, give):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "corpus")
        folder.mkdir()
        paths = []
        for i, (kind, suffix) in enumerate(spec):
            path = folder / f"doc{i}{suffix}"
            path.write_bytes(data.draw(CONTENTS[kind]))
            paths.append(path)
        given_paths = [folder] if give == "folder" or not paths else paths
        overrides = ["gpu=cpu", "mode=ultra_fast", "data=text_files", "data.vocab_size=512",
                     "data.paths=[" + ",".join(f"'{p}'" for p in given_paths) + "]", "data.tokenizer_train_mb=1",
                     f"data.cache_dir='{tmp}/cache'", f"run_dir='{tmp}/run'", "train.progress=false",
                     "train.max_steps=2", "train.sample_tokens=2", "train.eval_tokens=256"]  # fmt: skip
        error = outcome(overrides)
        event("trained" if error is None else f"refused: {str(error).split(':')[0][:40]}")
        if error is None:  # it trained: there was usable text, and enough of it
            assert any(kind in ("text", "english") for kind, suffix in spec)
        else:
            assert isinstance(error, PufferfishError) and str(error), repr(error)


def test_text_whose_lines_are_all_longer_than_sentencepiece_takes_still_trains(tmp_path):
    """sentencepiece skips lines over 16,384 bytes; the tokenizer is fed such lines in pieces."""
    corpus = tmp_path / "one_line.txt"
    corpus.write_text("the cat sat on the mat. " * 2000 + "\n")  # 48 kB, one line
    overrides = ["gpu=cpu", "mode=ultra_fast", "data=text_files", f"data.paths=['{corpus}']",
                 "data.vocab_size=512", f"data.cache_dir='{tmp_path}/cache'", f"run_dir='{tmp_path}/run'",
                 "train.progress=false", "train.max_steps=1", "train.sample_tokens=0"]  # fmt: skip
    assert outcome(overrides) is None  # trained: no error of any kind


def test_a_one_step_run_on_enough_text_trains(tmp_path, cache_dir):
    """The data fraction counts each window's extra target token, so one micro-batch always fits."""
    overrides = ("train.max_steps=1", "train.micro_batch=64", "train.batch_tokens=8192")  # 1.4 % of the corpus
    assert train(compose(*tiny_overrides(tmp_path / "run", cache_dir, *overrides)))["finished"]


# ---------------------------------------------------------------- the CLI, as the user sees it


def cli_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    binary = tmp / "photo.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    return {  # name: (overrides, a regular expression stderr must contain)
        "unknown_gpu": (["gpu=gtx1070"], r"gpu=gtx1070 is not an option of gpu; choose one of: .*rtx3060"),
        "wrong_type": (["model.num_layers=abc"], r"model\.num_layers(.|\n)*abc|abc(.|\n)*model\.num_layers"),
        "no_paths": (["data.paths=[]"], r"data\.paths=\[\]"),
        "missing_path": ([f"data.paths=['{tmp}/nowhere.txt']"], r"nowhere\.txt' does not exist"),
        "binary_file": ([f"data.paths=['{binary}']"], r"photo\.txt: it looks binary"),
        "kv_heads": (["model.num_kv_heads=3", "model.num_heads=8"], r"num_kv_heads=3 must divide model\.num_heads=8"),
        "negative_budget": (["mode.target_hours=-1"], r"mode\.target_hours=-1"),
        "null_group": (["model=null"], r"model=null: a config group needs an option name"),
        "added_key": (["+train.lerning_rate=0.1"], r"train\.lerning_rate: not a Pufferfish setting"),
        "measuring_job": (["job=measure"], r"job is not a setting of pufferfish\.train: .*python -m pufferfish\.lab\.measure"),
    }


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, cache_dir):
    """Every CLI case at once (they are independent): {name: (CompletedProcess-like, pattern)}."""
    tmp = tmp_path_factory.mktemp("cli-bad")
    cases, procs = cli_cases(tmp), {}
    assert sorted(cases) == sorted(CLI_NAMES)
    for name, (extra, _) in cases.items():
        run = tmp / name
        args = [*tiny_overrides(run, cache_dir, "dry_run=true"), f"hydra.run.dir={run}", *extra]
        procs[name] = subprocess.Popen([sys.executable, "-m", "pufferfish.train", *args], cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err, cases[name][1])
    return results


CLI_NAMES = ("unknown_gpu", "wrong_type", "no_paths", "missing_path", "binary_file", "kv_heads", "negative_budget",
             "null_group", "added_key", "measuring_job")  # fmt: skip


@pytest.mark.parametrize("name", CLI_NAMES)
def test_cli_bad_input_is_one_message_and_a_nonzero_exit(cli_results, name):
    code, out, err, pattern = cli_results[name]
    assert code != 0, out[-1000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert re.search(pattern, err), err[-2000:]
