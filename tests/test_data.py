"""Data: corpora, the stable split, the exact-round-trip tokenizer, the token cache and the batch stream.

Real text throughout, all of it from the interpreter's standard library: its source, and the English of the
language reference and the docstrings (tests/conftest.py's english_corpus, 1.1 MB), whole or cut into documents.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf

from pufferfish.config import DataConfig
from pufferfish.data import TrainBatches, load_prepared, prepare_data, val_batches
from pufferfish.data.corpora import split_documents
from pufferfish.data.tokenizer import Tokenizer, train_tokenizer
from pufferfish.data.tokens import CHUNK_CHARS, encode_split
from pufferfish.errors import ConfigError, DataError
from pufferfish.paths import CONF_DIR
from tests.conftest import english_corpus, english_file

PARTS = 24  # english_corpus() cut into documents of about 48 KB, at paragraph breaks
VAL_PARTS = ["part03.txt", "part11.txt", "part19.txt"]  # held out by data.val_paths
TRICKY = (
    "def f(x):\n\tif x:\n\t\treturn 'ñandú, café, 日本語, 🐡' + str(1234567890)\r\n    \n  trailing  \n\n"
)


def data_cfg(option: str, **overrides):
    # the real YAML option on the real schema, shrunk by overrides, as Hydra would compose it
    schema = OmegaConf.structured(DataConfig)
    return OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / "data" / f"{option}.yaml"), overrides)


def round_trips(tok: Tokenizer, text: str) -> bool:
    return tok.decode(tok.encode(text)) == text


@pytest.fixture(autouse=True)
def _offline_private_hf_cache(tmp_path_factory, monkeypatch):
    # as if HF_HUB_OFFLINE=1 were set: no test may reach the network, and none needs to
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # load_dataset of a local hub-style folder uses the datasets cache: keep it out of the machine's
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_cache")


@pytest.fixture(scope="session")
def stdlib(tmp_path_factory):
    cfg = data_cfg(
        "pystdlib", vocab_size=512, tokenizer_train_mb=2, cache_dir=str(tmp_path_factory.mktemp("c"))
    )
    return prepare_data(cfg, progress=False)


@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> Path:
    """A folder of PARTS English documents: english_corpus() cut at the paragraph break after each 1/PARTS."""
    folder = tmp_path_factory.mktemp("english_parts")
    text, start = english_corpus(), 0
    for i in range(PARTS):
        end = text.find("\n\n", (i + 1) * len(text) // PARTS) if i < PARTS - 1 else len(text)
        (folder / f"part{i:02d}.txt").write_bytes(text[start:end].encode("utf-8"))
        start = end + 2
    return folder


@pytest.fixture(scope="session")
def english_cfg(tmp_path_factory, parts):
    return data_cfg(
        "text_files",
        paths=[str(parts)],
        val_paths=[str(parts / p) for p in VAL_PARTS],
        vocab_size=1024,
        tokenizer_train_mb=1,
        cache_dir=str(tmp_path_factory.mktemp("c")),
    )


@pytest.fixture(scope="session")
def english(english_cfg):
    return prepare_data(english_cfg, progress=False)


def write_tokens(path: Path, n: int) -> Path:
    np.arange(n, dtype=np.uint16).tofile(path)  # token i at position i: every window says where it came from
    return path


# ---------------------------------------------------------------- corpora, split and cache


def test_pystdlib_corpus_is_large_with_a_hashed_validation_set(stdlib):
    meta = stdlib.meta
    assert meta["train"]["bytes"] > 1_000_000 and meta["train"]["documents"] > 100
    assert meta["val"]["documents"] > 0 and stdlib.val_tokens > 0 and meta["split"] == "hash"
    assert stdlib.dtype == "uint16" and stdlib.vocab_size == 512
    assert stdlib.train_path.stat().st_size == 2 * stdlib.train_tokens  # uint16 on disk
    assert np.memmap(stdlib.val_path, dtype=stdlib.dtype, mode="r").max() < stdlib.vocab_size
    assert 1.5 < stdlib.val_bytes_per_token < 8
    assert load_prepared(stdlib.dir) == stdlib


def test_tokenizer_round_trips_stdlib_source(stdlib):
    tok = stdlib.tokenizer()
    root = Path(sysconfig.get_paths()["stdlib"])
    for name in ["argparse.py", "textwrap.py", "json/decoder.py", "tabnanny.py"]:
        text = (root / name).read_text(encoding="utf-8")
        assert round_trips(tok, text), name
    assert round_trips(tok, TRICKY)
    assert tok.encode_batch([TRICKY, "x = 1\n"]) == [tok.encode(TRICKY), tok.encode("x = 1\n")]
    assert tok.decode(torch.tensor(tok.encode(TRICKY))) == TRICKY  # tensors are accepted too
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.decode([tok.eos_id]) == ""


def test_tokenizer_round_trips_held_out_english(english, parts):
    tok = Tokenizer.load(english.tokenizer_path)
    text = (parts / VAL_PARTS[0]).read_text(encoding="utf-8")  # held out: unseen by the tokenizer
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # it compresses: real merges, not bytes
    assert round_trips(tok, TRICKY + "O Romeo, Romeo! wherefore art thou Romeo?\t1597 — «naïve» Œdipus")


def test_long_documents_encode_in_pieces_exactly_as_whole(english, tmp_path):
    tok = english.tokenizer()
    text = english_file().read_text(encoding="utf-8")  # 1.1 MB: several pieces of CHUNK_CHARS
    assert len(text) > 3 * CHUNK_CHARS
    stats = encode_split(
        Dataset.from_dict({"text": [text, "x"]}), tok, tmp_path / "t.bin", "uint16", False, ""
    )
    tokens = np.fromfile(tmp_path / "t.bin", dtype=np.uint16).tolist()
    assert tokens == tok.encode(text) + [tok.eos_id] + tok.encode("x") + [tok.eos_id]
    assert stats == {"documents": 2, "bytes": len(text.encode("utf-8")) + 1, "tokens": len(tokens)}


def test_val_paths_form_the_validation_set(english, parts):
    meta = english.meta
    held_bytes = sum((parts / p).stat().st_size for p in VAL_PARTS)
    all_bytes = sum(p.stat().st_size for p in parts.glob("*.txt"))
    assert meta["split"] == "data.val_paths"
    assert 0.85 * held_bytes < meta["val"]["bytes"] <= held_bytes  # paragraph breaks are not text
    assert meta["train"]["bytes"] <= all_bytes - held_bytes


def test_training_windows_decode_to_corpus_text(english, parts):
    tok = english.tokenizer()
    corpus = "".join(p.read_text(encoding="utf-8") for p in parts.glob("*.txt") if p.name not in VAL_PARTS)
    with TrainBatches(english.train_path, english.dtype, 64, 4, seed=0) as batches:
        x, _ = batches.next()
    for row in x.tolist():  # documents (paragraphs here) are separated by end-of-text
        cuts = [-1] + [i for i, t in enumerate(row) if t == tok.eos_id] + [len(row)]
        for a, b in zip(cuts, cuts[1:]):
            assert tok.decode(row[a + 1 : b]) in corpus


def test_second_prepare_is_a_cache_hit(english_cfg, english):
    model_mtime = english.tokenizer_path.stat().st_mtime_ns
    again = prepare_data(english_cfg, progress=False)
    assert again.dir == english.dir and again.meta == english.meta
    assert english.tokenizer_path.stat().st_mtime_ns == model_mtime  # not retrained
    assert not list(english.dir.glob("*.tmp*"))  # no leftovers from the atomic writes


def test_vocab_or_text_change_is_a_cache_miss(tmp_path):
    text = tmp_path / "english.txt"
    text.write_text(english_corpus()[:300_000], encoding="utf-8")
    cfg = data_cfg("text_files", paths=[str(text)], vocab_size=512, cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg, progress=False)
    other_vocab = prepare_data(OmegaConf.merge(cfg, {"vocab_size": 640}), progress=False)
    assert other_vocab.dir != first.dir and (first.vocab_size, other_vocab.vocab_size) == (512, 640)
    with text.open("a") as f:
        f.write("\nEPILOGUE: a line the first entry has never seen.\n")
    assert prepare_data(cfg, progress=False).dir not in (first.dir, other_vocab.dir)


def test_split_is_stable_and_independent_of_document_order(tmp_path):
    paragraphs = [p for p in english_corpus().split("\n\n") if p.strip()]
    forward = split_documents(Dataset.from_dict({"text": paragraphs}), 0.05)
    backward = split_documents(Dataset.from_dict({"text": paragraphs[::-1]}), 0.05)
    assert forward.split == "hash" and set(forward.val["text"]) == set(backward.val["text"])
    assert 0.02 < len(forward.val) / len(paragraphs) < 0.08
    # the same through prepare_data, in two separate caches: byte-identical validation tokens
    cfgs = [
        data_cfg("text_files", paths=[str(english_file())], vocab_size=512, cache_dir=str(tmp_path / c)) for c in "ab"
    ]
    a, b = (prepare_data(c, progress=False) for c in cfgs)
    assert a.val_tokens > 0 and a.val_path.read_bytes() == b.val_path.read_bytes()


def test_few_documents_still_hold_out_validation_text(tmp_path):
    text = english_file().read_text(encoding="utf-8")
    docs = {"id": ["a.txt", "b.txt", "c.txt"], "text": [text[i::3] for i in range(3)]}
    corpus = split_documents(Dataset.from_dict(docs), 0.02)  # three keys: likely none below 0.02
    assert len(corpus.val) >= 1 and len(corpus.train) >= 1
    one = split_documents(Dataset.from_dict({"id": [english_file().name], "text": [text]}), 0.02)
    assert one.split == "tail of the only document" and one.train["text"][0].endswith(
        "\n"
    )  # cut at a line end
    assert one.train["text"][0] + one.val["text"][0] == text
    assert 0.015 < len(one.val["text"][0]) / len(text) < 0.03


def test_text_folder_is_searched_and_bad_files_are_skipped_with_a_warning(tmp_path, parts):
    docs = sorted(parts.glob("*.txt"))[:5]
    folder = tmp_path / "corpus"
    for i, (doc, suffix) in enumerate(zip(docs, [".txt", ".md", ".py", ".rst", ".TXT"])):
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 2}" / f"doc{i}{suffix}").write_bytes(doc.read_bytes())
    (folder / "notes.json").write_text('{"not": "searched"}')
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD.txt").write_text("hidden folders are not searched")
    (folder / "broken.txt").write_bytes(b"\x00\x01binary\x00" * 50)
    cfg = data_cfg(
        "text_files", paths=[str(folder)], sample_by="document", vocab_size=512, cache_dir=str(tmp_path / "c")
    )
    with pytest.warns(UserWarning, match=r"broken\.txt.*binary"):
        prepared = prepare_data(cfg, progress=False)
    meta = prepared.meta
    assert meta["train"]["documents"] + meta["val"]["documents"] == 5
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == sum(len(p.read_bytes()) for p in docs)


@pytest.mark.parametrize(
    "case, match",
    [
        ("empty_list", r"data\.paths=\[file_or_folder"),
        ("missing", r"nope\.txt.*does not exist"),
        ("no_text_folder", r"folder .*just_images.* has no text files"),
        ("empty_file", r"empty\.txt: it is empty"),
        ("binary", r"blob\.txt: it looks binary"),
        ("latin1", r"latin\.txt: it is not valid UTF-8 \(byte 3 is 0xe9\)"),
        ("tiny", r"one document .*tiny\.txt.* of 21 characters"),
    ],
)
def test_bad_text_inputs_name_the_value(tmp_path, case, match):
    files = {
        "empty_file": ("empty.txt", b""),
        "binary": ("blob.txt", bytes(range(256)) * 4),
        "latin1": ("latin.txt", "café au lait\n".encode("latin-1") * 50),
        "tiny": ("tiny.txt", b"to be or not to be?\n\n"),
    }
    paths = {"empty_list": [], "missing": [str(tmp_path / "nope.txt")]}.get(case)
    if case == "no_text_folder":
        (tmp_path / "just_images").mkdir()
        (tmp_path / "just_images" / "a.png").write_bytes(b"\x89PNG")
        paths = [str(tmp_path / "just_images")]
    if case in files:
        name, data = files[case]
        (tmp_path / name).write_bytes(data)
        paths = [str(tmp_path / name)]
    cfg = data_cfg(
        "text_files", paths=paths, sample_by="document", vocab_size=512, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(DataError, match=match):
        prepare_data(cfg, progress=False)


def test_bad_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.source='web'.*pystdlib, python, text, hub"):
        prepare_data(data_cfg("pystdlib", source="web", cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"data\.sample_by='sentence'"):
        prepare_data(data_cfg("text_files", paths=["x"], sample_by="sentence", cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"needs data\.paths="):  # the plain dataclass is accepted too
        prepare_data(DataConfig(name="mine", source="text", cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match="not a prepared data folder"):
        load_prepared(tmp_path)


def test_tokenizer_shrinks_a_vocab_the_corpus_cannot_fill(tmp_path, capsys):
    lines = ["def add(a, b):", "    return a + b", "print(add(1, 2))  # three"] * 20
    tok = train_tokenizer(lines, tmp_path / "t.model", vocab_size=8192)
    assert tok.vocab_size < 8192 and "data.vocab_size=8192" in capsys.readouterr().err
    assert round_trips(tok, "\n".join(lines) + "\n" + TRICKY)


# ---------------------------------------------------------------- hub


def test_hub_path_on_a_local_jsonl_folder(tmp_path):
    paragraphs = [p for p in english_corpus().split("\n\n") if p.strip()][:3000]
    folder = tmp_path / "local_hub"
    folder.mkdir()
    for part in range(2):
        with open(folder / f"part{part}.jsonl", "w") as f:
            for i, p in enumerate(paragraphs[part::2]):
                f.write(json.dumps({"content": p, "n": i}) + "\n")
    cfg = data_cfg(
        "tinystories",
        hub_name=str(folder),
        text_field="content",
        max_hub_documents=2000,
        vocab_size=512,
        cache_dir=str(tmp_path / "c"),
    )
    prepared = prepare_data(cfg, progress=False)
    assert prepared.meta["train"]["documents"] + prepared.meta["val"]["documents"] == 2000
    assert prepared.meta["split"] == "hash" and prepared.val_tokens > 0
    with pytest.raises(DataError, match=r"data\.text_field='story'.*columns: \['content', 'n'\]"):
        prepare_data(OmegaConf.merge(cfg, {"text_field": "story"}), progress=False)


def test_unreachable_hub_dataset_says_what_to_do(tmp_path):
    cfg = data_cfg("tinystories", hub_name="pufferfish-tests/no-such-dataset", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"could not load.*needs internet.*data=pystdlib.*data=text_files"):
        prepare_data(cfg, progress=False)


# ---------------------------------------------------------------- training stream


def stream(path, n, seq_len=16, **kw) -> list[torch.Tensor]:
    defaults = dict(micro_batch=4, seed=7, prefetch=0)
    with TrainBatches(path, "uint16", seq_len, **{**defaults, **kw}) as batches:
        return [batches.next()[0] for _ in range(n)]


def test_batches_are_shifted_windows(tmp_path):
    path = write_tokens(tmp_path / "t.bin", 10_000)
    with TrainBatches(path, "uint16", 16, 4, seed=0) as batches:
        x, y = batches.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x one step ahead
    assert torch.all(x[:, 0] % 17 == 0)  # non-overlapping windows of seq_len + 1


def test_stream_is_deterministic_and_prefetch_does_not_change_it(tmp_path):
    path = write_tokens(tmp_path / "t.bin", 10_000)  # 588 windows: 300 batches of 4 span two epochs
    plain = stream(path, 300)
    assert all(torch.equal(a, b) for a, b in zip(plain, stream(path, 300)))
    assert all(torch.equal(a, b) for a, b in zip(plain, stream(path, 300, prefetch=3)))
    assert not torch.equal(torch.stack(plain), torch.stack(stream(path, 300, seed=8)))


def test_resume_from_start_sample_equals_continuing(tmp_path):
    path = write_tokens(tmp_path / "t.bin", 10_000)
    one_by_one = torch.cat(stream(path, 700, micro_batch=1))  # sample i is row i: a pure function of i
    with TrainBatches(path, "uint16", 16, 4, seed=7, prefetch=2) as batches:
        for _ in range(150):
            batches.next()
        assert batches.sample == 600 and batches.epoch == pytest.approx(600 / 588)
        continued = torch.cat([batches.next()[0] for _ in range(20)])
    resumed = torch.cat(stream(path, 20, start_sample=600, prefetch=2))
    assert torch.equal(continued, resumed) and torch.equal(resumed, one_by_one[600:680])
    assert torch.equal(torch.cat(stream(path, 10, start_sample=3)), one_by_one[3:43])  # mid-batch start


def test_each_epoch_is_a_new_permutation_of_all_windows(tmp_path):
    path = write_tokens(tmp_path / "t.bin", 10_000)
    starts = torch.cat(stream(path, 2 * 588, micro_batch=1))[:, 0] // 17
    first, second = starts[:588], starts[588:]
    assert sorted(first.tolist()) == list(range(588)) == sorted(second.tolist())
    assert not torch.equal(first, second)


def test_fraction_limits_the_windows(tmp_path):
    path = write_tokens(tmp_path / "t.bin", 10_000)
    with TrainBatches(path, "uint16", 16, 4, seed=0, fraction=0.25, prefetch=0) as batches:
        assert batches.windows_per_epoch == 2500 // 17
        seen = torch.cat([batches.next()[1] for _ in range(100)])
    assert seen.max() < 2500
    with pytest.raises(
        DataError, match=r"leaves 100 of 10,000 tokens = 5 windows.*micro_batch=8 needs 136 tokens"
    ):
        TrainBatches(path, "uint16", 16, 8, seed=0, fraction=0.01)


def test_loader_thread_errors_reach_the_consumer_and_close_stops_it(tmp_path):
    path = write_tokens(tmp_path / "t.bin", 10_000)
    batches = TrainBatches(path, "uint16", 16, 4, seed=0, prefetch=2)

    def broken(first):
        raise OSError(f"disk went away at sample {first}")

    batches._build = broken  # the failure happens in the background thread
    with pytest.raises(OSError, match="disk went away at sample 0"):
        batches.next()
    batches.close()
    working = TrainBatches(path, "uint16", 16, 4, seed=0, prefetch=2)
    working.next()
    thread = working._thread
    working.close()
    assert not thread.is_alive()


def test_val_batches_are_fixed_and_spread_over_the_file(tmp_path):
    path = write_tokens(tmp_path / "v.bin", 5_000)
    first = list(val_batches(path, "uint16", 16, 4, max_tokens=160, device="cpu"))
    second = list(val_batches(path, "uint16", 16, 4, max_tokens=160, device="cpu"))
    assert [b[0].shape[0] for b in first] == [4, 4, 2]  # 160 // 16 = 10 windows
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    x = torch.cat([b[0] for b in first])
    y = torch.cat([b[1] for b in first])
    assert torch.equal(y, x + 1) and x[0, 0] == 0 and y[-1, -1] == 4_999  # first and last windows of the file
    assert torch.all(x[1:, 0] - x[:-1, 0] >= 17)  # no window overlaps the next
    with pytest.raises(DataError, match="has 10 tokens, fewer than one window of seq_len\\+1=17"):
        val_batches(write_tokens(tmp_path / "small.bin", 10), "uint16", 16, 4, max_tokens=160)
