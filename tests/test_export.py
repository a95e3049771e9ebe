"""Export: a trained run loads in transformers' LlamaForCausalLM with the same logits and tokenizer."""

import json

import pytest
import torch

from pufferfish.data.tokenizer import Tokenizer
from pufferfish.errors import ConfigError
from pufferfish.export import export
from pufferfish.generate import load_model
from pufferfish.model import ModelConfig, build_model
from pufferfish.model.sampling import generate
from pufferfish.train import train
from tests.conftest import compose, run_cli, tiny_overrides

transformers = pytest.importorskip("transformers")

# fp32 on both sides with the same operations: measured 0.0 on CPU; 1e-4 leaves room for other kernels
LOGIT_TOLERANCE = 1e-4
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n  It is the east, and 1234 is the sun."


def test_export_loads_in_transformers_with_matching_logits_and_tokenizer(tmp_path, cache_dir):
    run, out = tmp_path / "run", tmp_path / "hf"
    train(compose(*tiny_overrides(run, cache_dir, "train.max_steps=5", "model.num_layers=2", "model.num_dims=128",
                                  "model.num_heads=4", "model.num_kv_heads=2", "train.sample_tokens=0")))  # fmt: skip
    proc = run_cli("pufferfish.export", f"checkpoint={run}", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ["model.safetensors", "config.json", "generation_config.json", "tokenizer.model",
                 "tokenizer_config.json", "tokenizer.json"]:  # fmt: skip
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)

    ours, _ = load_model(run)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, ours.config.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < LOGIT_TOLERANCE, diff
    prompt = x[:1, :8]
    greedy = generate(ours, prompt, 8, temperature=0.0, top_k=0)
    assert torch.equal(greedy, hf.generate(prompt, max_new_tokens=8, do_sample=False))  # the KV cache path too

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = Tokenizer.load(run / "tokenizer.model").encode(TEXT)
    assert tok.encode(TEXT) == ids and tok.decode(ids) == TEXT  # no BOS added, no space invented or lost


def test_a_qk_norm_model_exports_as_qwen3_with_matching_logits(tmp_path, cache_dir):
    """model.qk_norm: Qwen3 is Llama's layout with RMSNorm over each head's queries and keys before RoPE."""
    run, out = tmp_path / "run", tmp_path / "hf"
    train(compose(*tiny_overrides(run, cache_dir, "train.max_steps=5", "model.num_layers=2", "model.num_dims=128",
                                  "model.num_heads=4", "model.num_kv_heads=2", "model.qk_norm=true",
                                  "train.sample_tokens=0")))  # fmt: skip
    export(run, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    ours, _ = load_model(run)
    assert not torch.equal(ours.layers[0].attention.q_norm.weight, torch.ones(32))  # trained: the mapping shows
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(out)).eval()
    assert hf.model.layers[1].self_attn.k_norm.weight.shape == (32,)
    x = torch.randint(0, ours.config.vocab_size, (2, ours.config.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < LOGIT_TOLERANCE, diff
    prompt = x[:1, :8]
    assert torch.equal(generate(ours, prompt, 8, temperature=0.0, top_k=0),
                       hf.generate(prompt, max_new_tokens=8, do_sample=False))  # fmt: skip


def test_mixture_of_experts_is_refused_with_a_reason(tmp_path):
    cfg = ModelConfig(num_layers=1, num_dims=64, num_heads=2, vocab_size=300, seq_len=16, use_moe=True)
    torch.save({"model": build_model(cfg).state_dict(), "model_config": cfg.to_dict()}, tmp_path / "moe.pt")
    with pytest.raises(ConfigError, match="mixture-of-experts.*no MoE layers"):
        export(tmp_path / "moe.pt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
