"""python -m pufferfish.export checkpoint=RUN_DIR_OR_FILE out=DIR: a checkpoint in Hugging Face's Llama layout.

DIR then holds model.safetensors, config.json and generation_config.json (LlamaForCausalLM; Qwen3ForCausalLM,
Llama's layout plus a norm over each head's queries and keys, for a model trained with model.qk_norm), and the
tokenizer: our sentencepiece model as tokenizer.model with a tokenizer_config.json for LlamaTokenizer, plus
tokenizer.json when transformers is installed and its conversion encodes exactly as sentencepiece does.
Pufferfish's rotary embeddings already use HF's rotate-half layout, so the weights need renaming only.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from .checkpoint import atomic_write_bytes, atomic_write_text
from .errors import CheckpointError, ConfigError, exit_on_user_error
from .generate import find_tokenizer, load_model
from .paths import CONF_DIR

# Pufferfish name (after "layers.N.") -> Hugging Face name (after "model.layers.N.")
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",  # SwiGLU: silu(gate) * up
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # model.qk_norm: Qwen3's names
    "attention.k_norm.weight": "self_attn.k_norm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
# texts the exported tokenizer.json must encode exactly as sentencepiece does: code, digits, non-ASCII
PROBE = "ROMEO:\nBut soft, what light\n\n    def f(x):\n\treturn x + 12345  # héllo ✓ 日本\n  two  spaces "


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "output.weight":
            continue  # tied to the embedding: tie_word_embeddings=true in config.json
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = tensor
            continue
        _, index, rest = name.split(".", 2)  # layers.N.rest
        if rest not in LAYER_NAMES:
            raise CheckpointError(f"weight {name} has no Hugging Face Llama counterpart")
        out[f"model.layers.{index}.{LAYER_NAMES[rest]}"] = tensor
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def hf_config(mc, tokenizer) -> dict:
    # Qwen3 is Llama with RMSNorm over each head's queries and keys before RoPE: a model.qk_norm model's layout
    family = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
              "sliding_window": None, "max_window_layers": mc.num_layers} if mc.qk_norm else \
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "mlp_bias": False}  # fmt: skip
    return {
        **family,
        "hidden_size": mc.num_dims,
        "intermediate_size": mc.ffn_dims,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_heads,
        "num_key_value_heads": mc.num_kv_heads,
        "head_dim": mc.head_dim,
        "vocab_size": mc.vocab_size,
        "max_position_embeddings": mc.seq_len,  # the RoPE tables were trained this long
        "rms_norm_eps": mc.norm_eps,
        "rope_theta": mc.rope_theta,  # transformers 4.x reads this ...
        "rope_parameters": {"rope_type": "default", "rope_theta": mc.rope_theta},  # ... and 5.x this
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": mc.init_std,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": None,
        "torch_dtype": "float32",  # transformers 4.x's key
        "dtype": "float32",  # transformers 5.x's key
        "use_cache": True,
    }


def tokenizer_config(tokenizer, seq_len: int) -> dict:
    sp = tokenizer.sp
    return {
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "bos_token": sp.id_to_piece(tokenizer.bos_id),
        "eos_token": sp.id_to_piece(tokenizer.eos_id),
        "pad_token": None,
        "add_bos_token": False,  # training text carries no BOS: documents are joined by EOS only
        "add_eos_token": False,
        "add_prefix_space": False,  # trained with add_dummy_prefix=false: no invented leading space
        "legacy": False,
        "clean_up_tokenization_spaces": False,  # spaces are content (code); decode must not rewrite them
        "model_max_length": seq_len,
        "sp_model_kwargs": {},
    }


def write_tokenizer_json(out: Path, tokenizer) -> str:
    """tokenizer.json converted by transformers, kept only if it encodes exactly as our sentencepiece."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return "no tokenizer.json: transformers is not installed (tokenizer.model is enough for it to convert)"
    try:
        hf = AutoTokenizer.from_pretrained(str(out))
    except Exception as e:  # any failure of an optional extra must not lose the export
        return f"no tokenizer.json: transformers could not convert tokenizer.model ({type(e).__name__}: {e})"
    if hf.encode(PROBE) != tokenizer.encode(PROBE) or hf.decode(hf.encode(PROBE)) != PROBE:
        return "no tokenizer.json: transformers' conversion does not encode exactly as sentencepiece"
    hf.backend_tokenizer.save(str(out / "tokenizer.json"))
    return "tokenizer.json written (checked against sentencepiece)"


def export(checkpoint: str | Path, out: str | Path, tokenizer_path: str | None = None) -> Path:
    model, path = load_model(checkpoint, "cpu")
    mc = model.config
    if mc.use_moe:
        raise ConfigError(
            f"{path} is a mixture-of-experts model ({mc.moe_num_experts} experts, top-{mc.moe_active_experts}); "
            f"Hugging Face's Llama has no MoE layers, so it cannot be exported in that layout. Export a dense "
            f"model (moe=none)"
        )
    tokenizer = find_tokenizer(path, tokenizer_path)
    if tokenizer.vocab_size != mc.vocab_size:
        raise ConfigError(f"{tokenizer.path} has {tokenizer.vocab_size} pieces but the model has "
                          f"vocab_size={mc.vocab_size}; pass the run's tokenizer with tokenizer=PATH")  # fmt: skip
    from safetensors.torch import save

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # written like every other file here (umask permissions, atomic); safetensors' save_file makes it 0600
        atomic_write_bytes(out / "model.safetensors", save(hf_state_dict(model), metadata={"format": "pt"}))
        atomic_write_text(out / "config.json", json.dumps(hf_config(mc, tokenizer), indent=2) + "\n")
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "do_sample": True,
                      "temperature": 0.8, "top_k": 50, "max_length": mc.seq_len}  # generate.py's defaults  # fmt: skip
        atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
        (out / "tokenizer.json").unlink(missing_ok=True)  # a stale one from an earlier export would win over .model
        atomic_write_text(out / "tokenizer_config.json", json.dumps(tokenizer_config(tokenizer, mc.seq_len), indent=2))
    except OSError as e:
        raise ConfigError(f"out={out} cannot be written ({e.strerror or e}: {e.filename or out}); choose a "
                          f"writable folder") from None  # fmt: skip
    note = write_tokenizer_json(out, tokenizer)
    print(f"exported {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) to {out} as "
          f"{hf_config(mc, tokenizer)['architectures'][0]}; {note}", file=sys.stderr)  # fmt: skip
    return out


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    export(cfg.checkpoint, cfg.out, cfg.tokenizer)


if __name__ == "__main__":
    from .overrides import check_command_line

    exit_on_user_error(check_command_line)(sys.argv[1:], "export")  # Hydra's own errors as one line
    main()
