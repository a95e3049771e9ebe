"""The resolver: memory terms by hand, monotonicity, fit, explanations, bad values."""

import os
from dataclasses import replace

import pytest
import torch

from pufferfish.errors import ConfigError
from pufferfish.model import ModelConfig, build_model, count_parameters
from pufferfish.resolver import (
    Shape,
    count_params,
    detect_hardware,
    grad_ckpt_for,
    make_plan,
    predict_peak_bytes,
    speed,
)
from pufferfish.resolver.hardware import (
    Hardware,
    known_profiles,
    load_profile,
    nearest_profile,
)
from pufferfish.resolver.memory import CONSTANTS, allocator_reserve_bytes
from pufferfish.resolver.plan import planned_config
from pufferfish.resolver.shapes import (
    fits,
    heads_reason,
    kv_heads_for,
    memory_shape,
    micro_batch_step,
    model_dict,
    usable_bytes,
)
from pufferfish.resolver.speed import flops_per_token, step_seconds
from tests.conftest import compose

GIB = 2**30


def fake_gpu(profile: str, precision: str = "bf16") -> Hardware:
    """The profile's own numbers, as if its card were present (this machine has no GPU)."""
    p = load_profile(profile)
    tensor = p.tflops_tensor if p.fast_fp16 and precision != "fp32" else p.tflops_fp32
    return Hardware(profile, "cuda:0", profile, int(p.vram_gb * GIB), precision, tensor * 1e12, p.mfu, False, [],
                    float(p.compute_capability), 1e9 * float(p.get("bandwidth_gbs", 0) or 0))  # fmt: skip


def small_shape(**kw) -> Shape:
    base = dict(num_layers=2, num_dims=64, num_heads=4, num_kv_heads=2, ffn_dims=192, vocab_size=100, seq_len=8)
    return Shape(**{**base, **kw})


def test_param_count_formula_matches_the_model_on_meta():
    for kw in [dict(), dict(num_kv_heads=1), dict(qk_norm=True), dict(use_moe=True, moe_num_experts=4,
                                                                    moe_active_experts=2, moe_shared_expert=True)]:  # fmt: skip
        mc = ModelConfig(num_layers=3, num_dims=128, num_heads=4, vocab_size=300, seq_len=16, **kw)
        model = build_model(mc, "meta")
        layers = sum(mc.is_moe_layer(i) for i in range(3))
        s = Shape(3, 128, 4, mc.num_kv_heads, mc.ffn_dims, 300, 16, moe_layers=layers,
                  moe_num_experts=mc.moe_num_experts if layers else 0, moe_active_experts=mc.moe_active_experts,
                  moe_expert_ffn_dims=mc.moe_expert_ffn_dims, moe_shared_expert=mc.moe_shared_expert,
                  qk_norm=mc.qk_norm)  # fmt: skip
        assert count_params(s) == count_parameters(model)


def test_memory_terms_by_hand():
    s = small_shape(micro_batch=2)
    P = 100 * 64 + 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 + 3 * 64 * 192)
    m = predict_peak_bytes(s)
    assert (m.weights, m.gradients, m.optimizer, m.autocast_copies) == (4 * P, 4 * P, 8 * P, 0)
    tokens, k = 16, CONSTANTS.activation_calibration["fp32"]  # the measured factor on the dynamic terms
    per_layer = 4 * (7 * 64 + 2 * 32 + 4 * 192)
    assert m.activations == int(k * tokens * (2 * per_layer + 2 * 4 * 64))
    assert m.logits == int(k * tokens * 100 * 12)
    assert m.attention_scores == 0
    bf = predict_peak_bytes(replace(s, precision="bf16"))
    assert bf.autocast_copies == 2 * P and bf.activations < m.activations
    ck = predict_peak_bytes(replace(s, grad_ckpt=True))
    assert abs(ck.activations - k * tokens * (2 * 4 * 64 + per_layer + 2 * 4 * 64)) <= 1
    assert ck.logits == 0  # the loss (1200 B/token) is over before the recomputed block (5120 B/token) exists
    # compiled: fp32 residual into two norms, q, k, v, attention output and two SwiGLU matmul outputs
    compiled = predict_peak_bytes(replace(s, compiled=True))
    compiled_layer = 2 * 4 * 64 + 4 * (2 * 64 + 2 * 32 + 2 * 192)  # 2816
    assert abs(compiled.activations - 1.30 * tokens * (2 * compiled_layer + 2 * 4 * 64)) <= 1
    assert compiled.logits == tokens * 100 * (2 + 3)  # 16-bit logits; +3 B: 100 is not a multiple of 64
    aligned = predict_peak_bytes(replace(s, compiled=True, vocab_size=128))
    assert aligned.logits == tokens * 128 * 2  # the graph keeps only the 16-bit logits
    chunked = predict_peak_bytes(replace(s, compiled=True, vocab_size=128, chunked_loss=True))
    assert chunked.logits == aligned.logits  # traced into the graph, every chunk's logits are kept (measured)
    # compiled and checkpointed: block inputs at 0.75 of fp32, the recomputed block, the loss at 1.5x its logits
    cc = predict_peak_bytes(replace(s, compiled=True, vocab_size=128, grad_ckpt=True))
    block = 1.30 * tokens * compiled_layer
    assert abs(cc.activations - (1.30 * tokens * 2 * 4 * 64 + 0.75 * tokens * 2 * 4 * 64 + block)) <= 1
    assert abs(cc.logits - max(0, 1.5 * tokens * 128 * 2 - block)) <= 1
    math_attn = predict_peak_bytes(replace(s, attention_math=True))
    assert math_attn.attention_scores == 2 * 2 * 4 * 8 * 8 * 4 * 2
    tried = replace(CONSTANTS, compiled_layer_factor=2.6, compiled_unaligned_vocab_bytes=0)  # constants to try
    other = predict_peak_bytes(replace(s, compiled=True), tried)
    assert abs(other.activations - 2 * compiled.activations) <= 1 and other.logits == tokens * 100 * 2
    assert predict_peak_bytes(replace(s, compiled=True)) == compiled  # the committed ones are untouched


def test_a_step_of_one_micro_batch_makes_its_gradients_in_the_backward():
    """grads_in_forward=False (no accumulation): the peak is the larger of the loss's backward, when only the
    tied output weight has its gradient, and the end of the blocks' backward, every gradient made."""
    s = small_shape(micro_batch=64, seq_len=64, grads_in_forward=False)
    P, out = count_params(s), 4 * 100 * 64  # the output weight's fp32 gradient
    with_grads = predict_peak_bytes(replace(s, grads_in_forward=True))
    m = predict_peak_bytes(s)  # activations and logits outweigh the gradients here: the loss's moment
    assert (m.gradients, m.activations, m.logits) == (out, with_grads.activations, with_grads.logits)
    assert m.total < with_grads.total
    big = small_shape(micro_batch=1, seq_len=2, num_dims=512, ffn_dims=1536, num_heads=8, grads_in_forward=False)
    m = predict_peak_bytes(big)  # a large model on 2 tokens: the end of the backward, all gradients and no activations
    assert (m.gradients, m.activations, m.logits) == (4 * count_params(big), 0, 0)
    assert P < count_params(big)


def test_a_plan_reports_the_gradients_its_run_will_hold():
    """Planned with every gradient alive (safe), reported as the run holds them: a plan of one micro-batch
    a step counts at its peak only what its backward has made by then; with accumulation, all of them."""
    fixed = ("gpu=rtx3060", "mode=quick_dev", "model.num_layers=4", "model.num_dims=256", "model.seq_len=512",
             "train.micro_batch=16")  # fmt: skip
    hw = fake_gpu("rtx3060")
    one, two = (make_plan(compose(*fixed, f"train.batch_tokens={16 * 512 * k}"), hw, 8192, 10**9) for k in (1, 2))
    assert (one.grad_accum, two.grad_accum) == (1, 2)
    assert two.memory_breakdown["gradients"] == 4 * two.params  # fp32 gradients, there from the first micro-batch
    assert one.memory_breakdown["gradients"] < 4 * one.params and one.predicted_peak_bytes < two.predicted_peak_bytes


def test_fsdp2_shards_weights_gradients_and_optimizer_state():
    s = small_shape(micro_batch=2)
    P, layer = count_params(s), 2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 + 3 * 64 * 192
    one, four = predict_peak_bytes(s), predict_peak_bytes(replace(s, shards=4))
    gathered = 4 * (100 * 64 + 2 * layer)  # fp32: the root's tied embedding and two blocks, in full
    assert (four.weights, four.gradients, four.optimizer) == (P + gathered, P + gathered, 2 * P)
    assert (four.activations, four.logits) == (one.activations, one.logits)  # each rank's own micro-batch
    bf = predict_peak_bytes(replace(s, shards=4, precision="bf16"))
    assert bf.autocast_copies == 0 and bf.weights == P + gathered // 2  # gathered in bf16: nothing to cast


def test_the_default_recipe_is_muon_with_wsd_to_zero_on_sequences_of_1024():
    """The recipe that, planned for 300 s on one H100, reached nanoGPT's 10-minute loss in 0.43 of nanoGPT's time
    (docs/benchmarks.md, "The default recipe"): Muon at 0.02 with its AdamW part at 3e-3 at every width, WSD
    decaying over the last 40 % of the steps to zero, quick_dev sequences of 1,024; the plan is that run's."""
    from pufferfish.resolver.plan import MUON_ADAMW_LR

    cfg = compose("gpu=h100", "mode=quick_dev", f"mode.target_hours={300 / 3600}")
    plan = make_plan(cfg, fake_gpu("h100"), 8192, 128_300_000)
    assert plan.optimizer["name"] == "muon" and plan.optimizer["muon_lr"] == 0.02
    assert plan.lr == MUON_ADAMW_LR == 3e-3 and "beside Muon, at every width" in plan.reasons["lr"]
    assert plan.schedule == {"schedule": "wsd", "warmup_frac": 0.05, "min_lr_ratio": 0.0, "decay_frac": 0.4}
    assert (plan.model["num_layers"], plan.model["num_dims"], plan.seq_len, plan.batch_tokens) == (11, 512, 1024, 2**17)
    wide = make_plan(compose("gpu=h100", "mode=standard", "model.num_layers=12", "model.num_dims=768"),
                     fake_gpu("h100"), 8192, 10**9)  # fmt: skip
    assert wide.lr == 3e-3 and wide.seq_len == 1024  # where AdamW's width rule gives 6e-4
    assert make_plan(compose("gpu=h100", "mode=ultra_fast"), fake_gpu("h100"), 8192, 10**8).seq_len == 128
    adamw = make_plan(compose("gpu=h100", "mode=quick_dev", "optim.name=adamw"), fake_gpu("h100"), 8192, 10**9)
    assert adamw.lr == pytest.approx(min(3e-3, 6e-4 * 768 / adamw.model["num_dims"])) and "width" in adamw.reasons["lr"]
    mine = make_plan(compose("gpu=h100", "mode=quick_dev", "optim.lr=0.001"), fake_gpu("h100"), 8192, 10**9)
    assert mine.lr == 0.001 and "set by you" in mine.reasons["lr"]


def test_auto_plans_muon_unless_its_plan_reads_the_data_more_than_five_times():
    """optim.name=auto (the default) takes Muon's plan, or AdamW's where Muon's would read the data more than
    MUON_MAX_EPOCHS times: on an H100, Muon handed over lower on the default corpus (128.3M tokens, up to 2.5
    passes) and AdamW on Shakespeare (1.38M tokens, planned for about 20 passes); on the CPU the two met at 5
    (docs/benchmarks.md). The chosen plan is the plan of that optimizer named outright, its reason saying why."""
    from pufferfish.resolver.plan import MUON_MAX_EPOCHS, OPTIMIZER_DEFAULTS

    budget = ("gpu=h100", "mode=quick_dev", f"mode.target_hours={300 / 3600}")

    def plans(corpus_tokens):
        return {name: make_plan(compose(*budget, f"optim.name={name}"), fake_gpu("h100"), 8192, corpus_tokens)
                for name in ("auto", "muon", "adamw")}  # fmt: skip

    def same(a, b):  # the whole plan, but for the reason that says how the optimizer was chosen
        return {**a.to_dict(), "reasons": None} == {**b.to_dict(), "reasons": None}

    big, small = plans(128_300_000), plans(1_381_526)
    assert big["muon"].epochs <= MUON_MAX_EPOCHS < small["muon"].epochs
    assert same(big["auto"], big["muon"]) and big["auto"].optimizer["name"] == "muon"
    assert big["auto"].reasons["optimizer"].startswith(f"chosen by optim.name=auto: Muon's plan reads the data "
                                                       f"{big['muon'].epochs:.1f} times, at most 5;")  # fmt: skip
    assert same(small["auto"], small["adamw"]) and small["auto"].optimizer == {**OPTIMIZER_DEFAULTS}
    assert small["auto"].reasons["optimizer"].startswith(f"AdamW, chosen by optim.name=auto: Muon's plan reads the "
                                                         f"data {small['muon'].epochs:.1f} times, over 5")  # fmt: skip
    assert small["muon"].optimizer["name"] == "muon"  # named outright, Muon stays whatever the passes
    for corpus_tokens in (15_000_000, 45_000_000, 60_000_000):  # Muon's plans: 16.7, 5.6 and 3.8 passes
        chosen = plans(corpus_tokens)
        assert chosen["auto"].optimizer["name"] == ("muon" if chosen["muon"].epochs <= MUON_MAX_EPOCHS else "adamw")


def test_fsdp2_plans_each_gpu_for_its_shard():
    fixed = ("gpu=gtx1650", "mode=standard", "model.num_layers=24", "model.num_dims=768", "optim.name=adamw")
    hw = fake_gpu("gtx1650", "fp16")  # AdamW: two fp32 moments a parameter, split over the ranks
    ddp = make_plan(compose(*fixed), hw, 8192, 10**9, world_size=8)
    fsdp = make_plan(compose(*fixed, "train.parallel=fsdp2"), hw, 8192, 10**9, world_size=8)
    assert fsdp.memory_breakdown["optimizer"] == ddp.memory_breakdown["optimizer"] // 8 == fsdp.params  # 8 B / 8
    assert fsdp.predicted_peak_bytes <= fsdp.vram_bytes and "sharded over 8 (FSDP2)" in fsdp.reasons["memory"]
    assert make_plan(compose(*fixed, "train.parallel=fsdp2"), hw, 8192, 10**9).memory_breakdown == \
        make_plan(compose(*fixed), hw, 8192, 10**9).memory_breakdown  # one process: nothing to shard  # fmt: skip


def test_chunked_loss_caps_logit_memory():
    s = small_shape(micro_batch=64, seq_len=256, vocab_size=32000)
    full, chunked = predict_peak_bytes(s), predict_peak_bytes(replace(s, chunked_loss=True, loss_chunk_tokens=1024))
    assert chunked.logits < full.logits / 8


def test_flops_per_token_convention():
    s = small_shape()
    assert flops_per_token(s) == 6 * count_params(s) + 12 * 2 * 64 * 8


def test_small_gpu_steps_cost_their_kernel_launches():
    """A tiny model on a GPU: the host launching kernels binds, whatever the FLOPs; on a CPU the FLOPs do, at a
    share of the rate that narrow layers reach less of."""
    s = small_shape(micro_batch=4)  # 2 layers of 64 dims, 32 tokens
    share = 0.5 * 64 / (64 + speed.CONSTANTS.cpu_half_share_dims)
    assert step_seconds(s, 1e12, 0.5, on_gpu=False) == pytest.approx(flops_per_token(s) * 32 / (1e12 * share))
    fitted = speed.CONSTANTS
    step_s, eager, compiled = fitted.host_step_s, fitted.host_layer_s["eager"], fitted.host_layer_s["compiled"]
    assert step_seconds(s, 1e12, 0.5, on_gpu=True) == pytest.approx(step_s + 2 * eager)  # per step + per layer
    assert step_seconds(replace(s, micro_batch=64), 1e12, 0.5, True) == pytest.approx(step_s + 2 * eager)  # batch is free
    assert step_seconds(replace(s, compiled=True), 1e12, 0.5, True) == pytest.approx(step_s + 2 * compiled)
    ck = fitted.checkpoint_host_factor  # checkpointed blocks launch their forward again, compiled or not
    assert step_seconds(replace(s, grad_ckpt=True), 1e12, 0.5, True) == pytest.approx(step_s + 2 * eager * ck)
    assert step_seconds(replace(s, grad_ckpt=True, compiled=True), 1e12, 0.5, True) == pytest.approx(
        step_s + 2 * compiled * ck)  # fmt: skip
    moe = replace(s, moe_layers=2, moe_num_experts=4, moe_active_experts=2, moe_expert_ffn_dims=96)
    assert step_seconds(moe, 1e12, 0.5, True) == pytest.approx(step_s + 2 * fitted.moe_layer_launches * eager)
    tried = replace(fitted, host_step_s=0.0, host_layer_s={"eager": 1e-3, "compiled": 5e-4})  # constants to try
    assert step_seconds(s, 1e12, 0.5, True, constants=tried) == pytest.approx(2e-3)
    assert step_seconds(s, 1e12, 0.5, on_gpu=True) == pytest.approx(step_s + 2 * eager)  # the committed: untouched


def test_big_gpu_steps_cost_their_flops_at_a_share_that_grows_with_width():
    big = Shape(2, 1024, 16, 4, 2816, 32000, 1024, micro_batch=64, precision="bf16", compiled=True)
    flops, h200 = flops_per_token(big) * 64 * 1024, (989e12, 0.55)
    D = speed.CONSTANTS.half_share_dims  # without a bandwidth: fitted on the H200
    assert step_seconds(big, *h200, True) == pytest.approx(flops / (989e12 * 0.55 * 1024 / (1024 + D)))
    assert step_seconds(replace(big, compiled=False), *h200, True) == pytest.approx(  # unfused kernels
        speed.CONSTANTS.eager_gpu_factor * flops / (989e12 * 0.55 * 1024 / (1024 + D)))
    # with the bandwidth, the roofline's ridge: 2 bytes x 989 TFLOP/s / 4.8 TB/s = 412 dims (4 bytes at TF32's half rate)
    ridge = 2 * 989e12 / 4.8e12
    assert step_seconds(big, *h200, True, bandwidth=4.8e12) == pytest.approx(flops / (989e12 * 0.55 * 1024 / (1024 + ridge)))
    fp32 = replace(big, precision="fp32")
    assert step_seconds(fp32, 494.5e12, 0.55, True, 4.8e12) == pytest.approx(2 * step_seconds(big, *h200, True, 4.8e12))
    # FLOP-bound: twice the tokens take twice the time; wider layers reach a larger share of the peak
    assert step_seconds(replace(big, micro_batch=128), *h200, True) == pytest.approx(2 * step_seconds(big, *h200, True))
    per_flop = [step_seconds(replace(big, num_dims=d, num_heads=d // 64), *h200, True)
                / flops_per_token(replace(big, num_dims=d, num_heads=d // 64)) for d in (512, 1024, 2048)]  # fmt: skip
    assert per_flop[0] > per_flop[1] > per_flop[2]
    slow_gpu = step_seconds(big, 25.4e12, 0.33, True, 360e9)  # an RTX 3060: its own ridge, 141 dims
    assert slow_gpu == pytest.approx(flops / (25.4e12 * 0.33 * 1024 / (1024 + 2 * 25.4e12 / 360e9)))


def test_profiles_are_known_and_complete():
    names = known_profiles()
    for n in ["cpu", "auto", "gtx1650", "gtx1060", "rtx2060", "rtx3060", "rtx3090", "rtx4060", "rtx4090",
              "a100_40gb", "a100_80gb", "h100", "h200"]:  # fmt: skip
        assert n in names
    assert not load_profile("gtx1060").fast_fp16 and not load_profile("gtx1060").bf16
    assert load_profile("rtx3060").bf16
    assert nearest_profile("NVIDIA H200", 141 * GIB) == "h200"
    assert nearest_profile("NVIDIA A100-SXM4-40GB", 40 * GIB) == "a100_40gb"
    assert nearest_profile("Some Future Card", 12 * GIB) == "rtx3060"


def test_bad_profile_names_the_known_ones():
    with pytest.raises(ConfigError, match="gpu=gtx1070 is not a known profile; known: .*gtx1060"):
        load_profile("gtx1070")


def test_kv_heads_follow_the_attention_option():
    cfg = compose("attention=gqa")
    assert kv_heads_for(12, cfg.attention) == 3 and kv_heads_for(10, cfg.attention) == 2
    assert kv_heads_for(12, compose("attention=mqa").attention) == 1
    assert kv_heads_for(12, compose("attention=mha").attention) == 12


def test_grouped_attention_chooses_heads_that_group_and_says_so():
    cfg = compose("attention=gqa", "model.num_layers=4", "model.num_dims=704")
    mc = model_dict(cfg, 4, 704, 8192, 256)
    assert (mc["num_heads"], mc["num_kv_heads"]) == (8, 2)  # not 11 heads of 64 over 1 kv head
    assert heads_reason(mc, cfg) == ("8 heads of 88 dims, 2 kv heads: 4 query heads share each kv head "
                                     "(attention=gqa asks 4 per kv head); not 11 heads of 64: 11 do not split "
                                     "into groups of 4")  # fmt: skip
    mha = compose("attention=mha")
    assert model_dict(mha, 4, 704, 8192, 256)["num_heads"] == 11  # one kv head per query head: 11 is fine


@pytest.mark.parametrize("mode", ["ultra_fast", "quick_dev", "standard", "extended"])
@pytest.mark.parametrize("gpu", sorted(set(known_profiles()) - {"auto", "cpu"}))
def test_every_gqa_plan_groups_about_four_query_heads_per_kv_head_or_says_why(gpu, mode):
    cfg = compose(f"gpu={gpu}", f"mode={mode}", "attention=gqa")
    plan = make_plan(cfg, fake_gpu(gpu, "bf16" if cfg.gpu.bf16 else "fp16"), 8192, 50_000_000)
    heads, kv = plan.model["num_heads"], plan.model["num_kv_heads"]
    reason = plan.reasons["heads"]
    assert reason.startswith(f"{heads} heads of {plan.model['num_dims'] // heads} dims, {kv} kv heads: ")
    assert "(attention=gqa asks 4 per kv head)" in reason
    assert 4 / 1.5 <= heads / kv <= 4 * 1.5 or "split into no head count of whole groups of 4" in reason, reason


@pytest.mark.parametrize("mode", ["ultra_fast", "quick_dev", "standard", "extended"])
@pytest.mark.parametrize("gpu", ["gtx1650", "gtx1060", "rtx3060", "rtx4090", "h200"])
def test_every_plan_fits_its_memory_and_respects_mode_bounds_or_says_why(gpu, mode):
    cfg = compose(f"gpu={gpu}", f"mode={mode}")
    hw = fake_gpu(gpu, "bf16" if cfg.gpu.bf16 else "fp16")
    plan = make_plan(cfg, hw, 8192, 50_000_000)
    assert plan.predicted_peak_bytes <= plan.vram_bytes
    assert plan.model["num_layers"] <= cfg.mode.max_layers and plan.model["num_dims"] <= cfg.mode.max_dims
    inside = plan.model["num_layers"] >= cfg.mode.min_layers and plan.model["num_dims"] >= cfg.mode.min_dims
    assert inside or any(w in plan.reasons["outside_mode"] for w in ("below the mode's bounds", "below them"))
    assert plan.micro_batch * plan.seq_len * plan.grad_accum == plan.batch_tokens
    assert plan.binding_constraint in ("time", "memory", "data", "mode", "user")
    for key in ("shape", "batch", "steps", "data", "lr", "memory"):
        assert plan.reasons[key]
    if plan.grad_accum > 1:  # memory binds the micro-batch: the next size up (in the planner's steps) would not fit
        step = micro_batch_step(plan.micro_batch)
        assert plan.micro_batch % step == 0 and (plan.micro_batch < 8 or plan.micro_batch % 2 == 0)
        ran = planned_config(cfg, plan.optimizer)  # the optimizer state the plan holds
        bigger = memory_shape(plan.model, ran, hw, plan.micro_batch + step, plan.grad_ckpt)
        assert fits(memory_shape(plan.model, ran, hw, plan.micro_batch, plan.grad_ckpt), hw) and not fits(bigger, hw)


def test_a_compiled_plan_leaves_its_logits_free_for_the_allocator():
    # rtx4060 quick_dev planned 112 x 512 compiled: 6.71 GiB allocated (6.78 predicted), and the allocator held
    # 0.70 GiB more beyond it, past the 7.41 GiB cap (H100, 2026-12-05): one micro-batch's 16-bit logits are
    # 0.88 GiB; an eager step leaves no such room
    cfg = compose("gpu=rtx4060", "mode=quick_dev", "train.batch_tokens=262144")  # the batch planned then
    hw = fake_gpu("rtx4060", "bf16")
    plan = make_plan(cfg, hw, 8192, 50_000_000)
    assert plan.compile and plan.grad_accum > 1  # memory binds the micro-batch
    logits = plan.micro_batch * plan.seq_len * 8192 * 2
    assert plan.predicted_peak_bytes + logits <= usable_bytes(hw)
    assert "allocator holds around the compiled step's logits" in plan.reasons["memory"]
    # 104 x 512 x 5 is not the 2^18 tokens the batch asked for: the reason says what runs
    assert plan.batch_tokens != 2**18 and f"{plan.batch_tokens:,} run" in plan.reasons["batch"]
    eager = memory_shape(plan.model, planned_config(cfg, plan.optimizer), hw, plan.micro_batch, plan.grad_ckpt)
    assert allocator_reserve_bytes(replace(eager, compiled=False)) == 0


def test_more_vram_never_gives_a_smaller_model():
    cfg = compose("gpu=rtx4090", "mode=standard", "mode.target_hours=3")
    sizes = []
    for gib in [4, 6, 8, 12, 24, 48]:
        hw = replace(fake_gpu("rtx4090"), vram_bytes=gib * GIB)
        sizes.append(make_plan(cfg, hw, 8192, 10**9).params)
    assert sizes == sorted(sizes)


def test_more_hours_never_fewer_tokens():
    # from 1 h: at 0.5 h this card's smallest standard shape gets under one token per parameter, and the plan
    # leaves the mode's bounds for a smaller model that processes more tokens (a different regime)
    tokens = []
    for hours in [1, 1.5, 2, 3]:
        cfg = compose("gpu=rtx3060", "mode=standard", f"mode.target_hours={hours}")
        tokens.append(make_plan(cfg, fake_gpu("rtx3060"), 8192, 10**9).train_tokens)
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1]


def test_small_data_is_named_as_the_binding_limit():
    cfg = compose("gpu=h200", "mode=standard")
    plan = make_plan(cfg, fake_gpu("h200"), 8192, 1_000_000)
    assert plan.binding_constraint == "data" and plan.epochs > 4
    assert "the data binds" in plan.reasons["hours_vs_data"] and plan.limits["hours_tokens"] > 1_000_000


def test_gradient_checkpointing_only_when_needed():
    cfg = compose("gpu=gtx1650", "mode=standard", "optimizations=all", "model.num_layers=24", "model.num_dims=768")
    hw = fake_gpu("gtx1650", "fp16")
    plan = make_plan(cfg, hw, 8192, 10**9)
    assert plan.grad_ckpt and "does not fit" in plan.reasons["grad_ckpt"]
    ran = planned_config(cfg, plan.optimizer)  # the optimizer state the plan holds
    assert grad_ckpt_for(plan.model, ran, hw, 1)  # the search's rule: even one sequence does not fit without it
    assert not grad_ckpt_for(plan.model, ran, replace(hw, vram_bytes=80 * GIB), plan.micro_batch)
    big = make_plan(compose("gpu=h200", "mode=quick_dev"), fake_gpu("h200"), 8192, 10**9)
    assert not big.grad_ckpt
    fixed = compose("gpu=h200", "mode=quick_dev", "model.num_layers=24", "model.num_dims=768", "train.micro_batch=512")
    given = make_plan(fixed, fake_gpu("h200"), 8192, 10**9)
    assert given.grad_ckpt == grad_ckpt_for(model_dict(fixed, 24, 768, 8192, fixed.mode.seq_len),
                                            planned_config(fixed, given.optimizer), fake_gpu("h200"), 512)  # fmt: skip
    for policy, ckpt in (("always", True), ("never", False)):  # asked for: whatever the memory says
        asked = compose("gpu=gtx1650", "mode=standard", f"optimizations.grad_ckpt={policy}")
        assert grad_ckpt_for(plan.model, asked, replace(hw, vram_bytes=80 * GIB) if ckpt else hw, 64) is ckpt


def test_physics_moves_the_plan_outside_mode_bounds_with_a_reason():
    cfg = compose("gpu=gtx1650", "mode=extended", "optimizations=baseline")
    plan = make_plan(cfg, fake_gpu("gtx1650", "fp32"), 8192, 10**9)
    assert plan.model["num_layers"] * plan.model["num_dims"] < 30 * 768
    assert "needs about" in plan.reasons["outside_mode"] and plan.binding_constraint == "memory"
    slow = make_plan(compose("gpu=gtx1060", "mode=extended", "mode.target_hours=3"), fake_gpu("gtx1060", "fp16"),
                     8192, 10**9)  # fmt: skip
    assert "below them" in slow.reasons["outside_mode"] and slow.binding_constraint == "time"
    assert slow.train_tokens >= slow.params  # the mode's 30 x 768 would get under a token per parameter


def test_impossible_plan_says_what_to_change():
    cfg = compose("gpu=gtx1650", "mode=extended", "optimizations=baseline", "model.seq_len=32768")
    with pytest.raises(ConfigError, match="micro-batch 1 needs about"):
        make_plan(cfg, fake_gpu("gtx1650", "fp32"), 8192, 10**9)


@pytest.mark.parametrize("hours", [0, -1, 10**6])
def test_absurd_budgets_are_refused(hours):
    cfg = compose("gpu=cpu", f"mode.target_hours={hours}")
    with pytest.raises(ConfigError, match="target_hours"):
        make_plan(cfg, fake_gpu("rtx3060"), 8192, 10**6)


def test_cpu_profile_measures_this_machine():
    cfg = compose("gpu=cpu")
    hw = detect_hardware(cfg.gpu, cfg.optimizations, "auto")
    assert hw.device == "cpu" and hw.precision == "fp32" and hw.peak_flops > 1e8
    assert hw.vram_bytes > 0
    assert torch.get_num_threads() >= 1


def test_pascal_gets_fp32_and_fp16_only_when_asked_with_its_cost():
    from pufferfish.resolver.hardware import choose_precision

    precision, why = choose_precision("auto", bf16=False, fast_fp16=False, on_cpu=False)
    assert precision == "fp32" and "1/64 of fp32" in why  # fp16 there saves memory, never time
    precision, why = choose_precision("fp16", bf16=False, fast_fp16=False, on_cpu=False)
    assert precision == "fp16" and "costs speed" in why
    assert choose_precision("auto", bf16=False, fast_fp16=True, on_cpu=False)[0] == "fp16"  # Turing
    assert choose_precision("auto", bf16=True, fast_fp16=True, on_cpu=False)[0] == "bf16"
    with pytest.raises(ConfigError, match="8.0"):
        choose_precision("bf16", bf16=False, fast_fp16=True, on_cpu=False)


def test_the_plan_says_whose_micro_batch_it_is():
    hw = fake_gpu("rtx3060", "bf16")
    chosen = make_plan(compose("gpu=rtx3060", "mode=standard"), hw, 8192, 10**9)
    given = make_plan(compose("gpu=rtx3060", "mode=standard", "train.micro_batch=2"), hw, 8192, 10**9)
    assert "(the largest that fits)" in chosen.reasons["micro_batch"]
    assert given.micro_batch == 2 and "(set by you)" in given.reasons["micro_batch"]


def test_allocator_prefers_expandable_segments_but_keeps_the_users_setting(monkeypatch):
    from pufferfish.resolver import prefer_expandable_segments

    monkeypatch.setattr("torch.cuda.is_initialized", lambda: False)
    monkeypatch.setattr("sys.platform", "linux")
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setattr("torch.cuda.is_initialized", lambda: True)  # too late: the allocator has read it
    prefer_expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_micro_batches_round_down_by_at_most_a_ninth():
    for mb in range(1, 600):
        rounded = mb - mb % micro_batch_step(mb)
        assert rounded == mb if mb < 8 else rounded % 2 == 0 and (mb - rounded) / mb <= 1 / 9 + 1e-9, mb


def test_a_run_of_fixed_steps_spends_about_five_percent_of_its_work_on_evaluations_on_any_machine():
    # 30 steps of 8,192 tokens: 20+ evaluations of the default 65,536 tokens would read 7x the training's tokens
    cfg = compose("gpu=rtx3060", "mode=quick_dev", "train.max_steps=30", "train.batch_tokens=8192", "model.seq_len=256")
    plans = [make_plan(cfg, fake_gpu(p), 8192, 10**9) for p in ("rtx3060", "h200")]
    assert {(p.eval_tokens, p.final_eval_tokens) for p in plans} == {(2048, 14745)}  # the same on any card
    plan = plans[0]
    evals = plan.steps // plan.eval_interval
    assert plan.eval_tokens == 8 * 256  # the floor: 3 x 5 % x 245,760 / 30 evaluations is 1,228
    assert evals * plan.eval_tokens / 3 < 0.1 * plan.train_tokens  # a forward is a third of a step's work
    long = make_plan(compose("gpu=rtx3060", "mode=quick_dev", "train.max_steps=2000", "train.batch_tokens=65536"),
                     fake_gpu("rtx3060"), 8192, 10**9)  # fmt: skip
    assert (long.eval_tokens, long.final_eval_tokens) == (65536, 65536)  # a long run reads what it asks


def test_a_replanned_run_says_its_new_data_share_and_evaluations():
    # the card ran 1.4x faster than predicted: more steps, from more of the corpus, evaluated at a new cadence
    plan = make_plan(compose("gpu=rtx3060", "mode=quick_dev", "mode.target_hours=0.02"), fake_gpu("rtx3060"), 8192, 10**6)
    before = dict(plan.reasons)
    seconds_per_step = plan.batch_tokens / (1.4 * plan.predicted_tokens_per_s)
    plan.recalibrate(10, seconds_per_step, plan.time_budget_s * 0.9)
    assert plan.reasons["steps"].startswith(f"{plan.steps} steps: re-planned at step 10")
    assert plan.reasons["data"].startswith(f"{plan.data_fraction:.1%} of 1.00M corpus tokens, {plan.epochs:.2f} epoch")
    assert plan.reasons["data"] != before["data"]
    assert plan.reasons["eval"].startswith(f"every {plan.eval_interval} steps on {plan.eval_tokens:,} validation")
    assert plan.reasons["eval"] != before["eval"]


def test_muons_orthogonalisation_costs_its_flops_once_a_step():
    from pufferfish.resolver.speed import newton_schulz_flops

    s = small_shape(num_layers=1, num_dims=4, num_heads=2, num_kv_heads=1, ffn_dims=8, optimizer="muon")
    # per iteration 4 m^2 n + 2 m^3 (m the short side): wq, wo 4x4; wk, wv 2x4; gate, up, down 8x4; 5 iterations
    by_hand = 5 * (2 * (4 * 16 * 4 + 2 * 64) + 2 * (4 * 4 * 4 + 2 * 8) + 3 * (4 * 16 * 8 + 2 * 64))
    assert newton_schulz_flops(s) == by_hand == 14240
    assert newton_schulz_flops(replace(s, optimizer="adamw")) == 0
    # the 124M shape on an H200: a small batch pays for it, a large one hardly
    fixed = ("gpu=h200", "mode=standard", "model.num_layers=12", "model.num_dims=768", "model.seq_len=1024")
    for batch, slower in ((16384, (0.05, 0.3)), (524288, (0.0, 0.01))):
        speeds = [make_plan(compose(*fixed, f"train.batch_tokens={batch}", f"optim.name={o}"), fake_gpu("h200"),
                            32000, 10**10).predicted_tokens_per_s for o in ("adamw", "muon")]  # fmt: skip
        assert slower[0] <= 1 - speeds[1] / speeds[0] <= slower[1], (batch, speeds)


def test_a_muon_plan_trains_a_larger_model_on_fewer_tokens_per_parameter_and_says_why():
    # the isoFLOP sweep: at the same compute Muon's best model is larger (resolver/scaling.py TOKEN_WORTH)
    plans = {o: make_plan(compose("gpu=rtx3060", "mode=quick_dev", "mode.target_hours=0.25", f"optim.name={o}"),
                          fake_gpu("rtx3060"), 8192, 10**10) for o in ("adamw", "muon")}  # fmt: skip
    adamw, muon = plans["adamw"], plans["muon"]
    assert muon.params > adamw.params and muon.train_tokens / muon.params < adamw.train_tokens / adamw.params
    assert "counted as 3 of AdamW's" in muon.reasons["shape"] and "AdamW's" not in adamw.reasons["shape"]


def test_a_cpu_plan_sizes_its_batch_for_more_steps_than_a_gpu_plan():
    """The CPU's tokens/s does not grow with the batch, so its batch gives >= CPU_MIN_STEPS steps; a GPU's gives
    >= MIN_STEPS (its small batches run slower). The same hardware numbers, only the profile differs."""
    from pufferfish.resolver.search import CPU_MIN_STEPS, MIN_STEPS

    cpu = Hardware("cpu", "cpu", "cpu", 8 * GIB, "fp32", 2e11, 1.0, False, [], 0.0)
    gpu = replace(cpu, profile="gtx1060", device="cuda:0", compute_capability=6.1)
    for hw, floor in ((cpu, CPU_MIN_STEPS), (gpu, MIN_STEPS)):
        cfg = compose(f"gpu={hw.profile}", "mode=quick_dev", "mode.target_hours=0.1", "model.num_layers=2",
                      "model.num_dims=128")  # fmt: skip
        plan = make_plan(cfg, hw, 8192, 10**9)
        tokens = plan.predicted_tokens_per_s * plan.time_budget_s
        assert tokens / plan.batch_tokens >= floor > tokens / (2 * plan.batch_tokens)  # the largest power of two
        assert f">= {floor} steps" in plan.reasons["batch"]
    assert "(the CPU: smaller batches run as fast)" in make_plan(compose("gpu=cpu"), cpu, 8192, 10**9).reasons["batch"]
    # Muon's batch gives the same steps as AdamW's: on a GPU half of them lost (docs/benchmarks.md)
    for name, floor in (("adamw", MIN_STEPS), ("muon", MIN_STEPS)):
        cfg = compose("gpu=gtx1060", "mode=quick_dev", "mode.target_hours=0.1", "model.num_layers=2",
                      "model.num_dims=128", f"optim.name={name}")  # fmt: skip
        plan = make_plan(cfg, gpu, 8192, 10**9)
        tokens = plan.predicted_tokens_per_s * plan.time_budget_s
        assert tokens / plan.batch_tokens >= floor > tokens / (2 * plan.batch_tokens)
        assert f">= {floor} steps" in plan.reasons["batch"]
        assert f">= {floor} steps and" in plan.reasons["batch"]  # no other reason given


def test_a_long_gpu_plan_caps_its_batch_where_more_steps_reached_a_lower_loss():
    # on one H100, plans for 300 s on the default corpus: AdamW 1.251 at 65,536 tokens a step against 1.314 at
    # 262,144; Muon 1.231 at 131,072 against 1.257 at 65,536 and 262,144 (docs/benchmarks.md "Batch on the GPU")
    from pufferfish.resolver.search import LARGE_MODEL_BATCH_CAP, batch_cap

    for name, cap in (("adamw", 2**16), ("muon", 2**17)):
        cfg = compose("gpu=h100", "mode=quick_dev", f"mode.target_hours={300 / 3600}", f"optim.name={name}")
        plan = make_plan(cfg, fake_gpu("h100"), 8192, 128_300_000)
        assert plan.params < 100e6 and plan.batch_tokens == cap == batch_cap(plan.params, name)
        assert plan.predicted_tokens_per_s * plan.time_budget_s / plan.batch_tokens > 2 * 300  # the floor gave more
        assert f"at its cap for {name} at this size" in plan.reasons["batch"]
    assert batch_cap(124_000_000, "adamw") == batch_cap(124_000_000, "muon") == LARGE_MODEL_BATCH_CAP
    short = make_plan(compose("gpu=gtx1060", "mode=quick_dev", "mode.target_hours=0.01"), fake_gpu("gtx1060"), 8192, 10**9)
    assert short.batch_tokens < 2**16 and "at its cap" not in short.reasons["batch"]  # the floor binds first
    # a model too small to fill the GPU keeps a larger batch: 1 x 64 on an H100 runs faster at 131,072 tokens
    tiny = make_plan(compose("gpu=h100", "mode=ultra_fast", "optim.name=adamw"), fake_gpu("h100"), 8192, 10**8)
    assert tiny.params < 100e6 and tiny.batch_tokens > 2**16 and "above its cap for adamw" in tiny.reasons["batch"]
