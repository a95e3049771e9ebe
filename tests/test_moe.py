"""MoE feed-forward: routing maths, dropless dispatch, DeepSeek-V3 loss-free balancing, learning."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from pufferfish.model import ModelConfig, build_model
from pufferfish.model.moe import (
    MoEFeedForward,
    expert_swiglu,
    grouped_mm_usable,
    moe_aux_loss,
    moe_layers,
    moe_metrics,
    update_moe_biases,
)


def small_cfg(**changes) -> ModelConfig:
    base = dict(
        num_layers=2,
        num_dims=32,
        num_heads=2,
        vocab_size=64,
        seq_len=32,
        use_moe=True,
        moe_num_experts=8,
        moe_active_experts=2,
        moe_expert_ffn_dims=48,
    )
    return ModelConfig(**{**base, **changes})


def expert_out(moe: MoEFeedForward, e: int, x):
    """Expert e applied directly to x (..., C): the reference every dispatch must agree with."""
    return F.linear(F.silu(F.linear(x, moe.w1[e])) * F.linear(x, moe.w3[e]), moe.w2[e])


def naive_moe(moe: MoEFeedForward, x):
    """Per-token, per-chosen-expert Python loop over the module's own routing. x: (B, T, C)."""
    flat = x.reshape(-1, x.shape[-1])
    _, experts, gates = moe.route(flat)
    rows = []
    for n in range(flat.shape[0]):
        row = sum(gates[n, j] * expert_out(moe, int(experts[n, j]), flat[n]) for j in range(experts.shape[1]))
        if moe.shared_expert is not None:
            row = row + moe.shared_expert(flat[n])
        rows.append(row)
    return torch.stack(rows).view_as(x)


def grouped_mm_runs_on_cpu() -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        torch._grouped_mm(torch.ones(2, 8), torch.ones(2, 8, 8), offs=torch.tensor([1, 2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def test_all_experts_with_equal_gates_is_their_average():
    torch.manual_seed(0)
    moe = MoEFeedForward(small_cfg(moe_score_func="softmax", moe_active_experts=8))
    with torch.no_grad():
        moe.gate.weight.zero_()  # softmax of equal logits: every gate is 1/E
    x = torch.randn(2, 5, 32)
    expected = torch.stack([expert_out(moe, e, x) for e in range(8)]).mean(dim=0)
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shared", [False, True])
def test_batched_dispatch_matches_per_token_loop(score_func, shared):
    torch.manual_seed(1)
    moe = MoEFeedForward(small_cfg(moe_score_func=score_func, moe_shared_expert=shared, moe_active_experts=3))
    moe.expert_impl = "loop"
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(moe(x), naive_moe(moe, x), rtol=1e-5, atol=1e-6)


def test_auto_picks_loop_on_cpu_and_rejects_unknown_impl():
    x = torch.randn(4, 32)
    assert not grouped_mm_usable(x, 32, 48)
    weights = torch.randn(2, 48, 32), torch.randn(2, 32, 48), torch.randn(2, 48, 32)
    counts = torch.tensor([1, 3])
    torch.testing.assert_close(
        expert_swiglu(x, counts, *weights), expert_swiglu(x, counts, *weights, impl="loop")
    )
    with pytest.raises(ValueError, match="expert_impl='fast'"):
        expert_swiglu(
            x,
            torch.tensor([4]),
            torch.randn(1, 48, 32),
            torch.randn(1, 32, 48),
            torch.randn(1, 48, 32),
            impl="fast",
        )


@pytest.mark.skipif(not grouped_mm_runs_on_cpu(), reason="torch._grouped_mm has no CPU kernel in this torch")
def test_grouped_mm_matches_loop_values_and_grads():
    torch.manual_seed(2)
    E, C, H = 4, 32, 48
    xs = torch.randn(11, C, requires_grad=True)
    weights = [torch.randn(E, H, C) * 0.1, torch.randn(E, C, H) * 0.1, torch.randn(E, H, C) * 0.1]
    counts = torch.tensor([3, 0, 6, 2])  # an expert with no tokens must not break the offsets
    grad_out = torch.randn(11, C)
    results = []
    for impl in ("loop", "grouped_mm"):
        ws = [w.clone().requires_grad_() for w in weights]
        xs.grad = None
        y = expert_swiglu(xs, counts, *ws, impl=impl)
        (y * grad_out).sum().backward()
        results.append((y.detach(), xs.grad.clone(), [w.grad for w in ws]))
    (y_loop, gx_loop, gw_loop), (y_grp, gx_grp, gw_grp) = results
    torch.testing.assert_close(y_grp, y_loop)
    torch.testing.assert_close(gx_grp, gx_loop)
    for a, b in zip(gw_grp, gw_loop):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not grouped_mm_runs_on_cpu(), reason="torch._grouped_mm has no CPU kernel in this torch")
def test_module_grouped_path_matches_loop_path():
    torch.manual_seed(3)
    moe = MoEFeedForward(small_cfg(moe_shared_expert=True))
    x = torch.randn(2, 9, 32)
    moe.expert_impl = "loop"
    y_loop = moe(x)
    moe.expert_impl = "grouped_mm"
    torch.testing.assert_close(moe(x), y_loop)


def test_bias_is_a_saved_buffer_without_grad():
    moe = MoEFeedForward(small_cfg())
    names = {n for n, _ in moe.named_parameters()}
    assert "expert_bias" not in names and "expert_bias" in dict(moe.named_buffers())
    assert not moe.expert_bias.requires_grad
    assert "expert_bias" in moe.state_dict() and "tokens_per_expert" not in moe.state_dict()
    model = build_model(small_cfg())
    assert "layers.0.feed_forward.expert_bias" in model.state_dict()

    with torch.no_grad():
        moe.expert_bias.copy_(torch.linspace(-0.3, 0.4, 8))
    buffer = io.BytesIO()
    torch.save(moe.state_dict(), buffer)
    buffer.seek(0)
    fresh = MoEFeedForward(small_cfg())
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh.expert_bias, moe.expert_bias, rtol=0, atol=0)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_bias_changes_the_choice_not_the_gates(score_func):
    torch.manual_seed(4)
    moe = MoEFeedForward(small_cfg(moe_score_func=score_func))
    x = torch.randn(40, 32)
    logits = moe.gate(x)
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    _, before, _ = moe.route(x)
    assert (before == 5).sum() < 40  # expert 5 is not everyone's choice yet
    with torch.no_grad():
        moe.expert_bias[5] = 10.0
    routed_scores, after, gates = moe.route(x)
    assert (after == 5).any(dim=-1).all()  # now every token picks it
    assert not torch.equal(before.sort(-1).values, after.sort(-1).values)
    torch.testing.assert_close(routed_scores, scores)  # the bias never enters the scores
    chosen = scores.gather(-1, after)
    torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True))
    moe.expert_impl = "loop"
    torch.testing.assert_close(
        moe(x.view(4, 10, 32)), naive_moe(moe, x.view(4, 10, 32)), rtol=1e-5, atol=1e-6
    )


def test_update_moves_bias_by_sign_and_keeps_metrics():
    model = build_model(small_cfg(moe_bias_update_rate=0.01))
    layers = moe_layers(model)
    assert len(layers) == 2
    load = torch.tensor([40.0, 10, 10, 10, 10, 10, 10, 20])  # mean 15
    for layer in layers:
        layer.tokens_per_expert.copy_(load)
    update_moe_biases(model)
    expected = 0.01 * torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, -1])
    for layer in layers:
        torch.testing.assert_close(layer.expert_bias, expected)
        assert not layer.tokens_per_expert.any()  # reset for the next step
    metrics = moe_metrics(model)  # after the update, still describes the step that just ended
    assert metrics["moe/L1/imbalance"] == pytest.approx(40 / 15)
    assert metrics["moe/imbalance_max"] == pytest.approx(40 / 15)
    assert metrics["moe/L0/frac_e0"] == pytest.approx(40 / 120)
    assert metrics["moe/L0/bias_min"] == pytest.approx(-0.01)
    assert metrics["moe/L0/bias_max"] == pytest.approx(0.01)
    assert all("moe" in key for key in metrics)


def test_counts_only_in_training_and_bias_frozen_without_lossfree():
    model = build_model(small_cfg(use_lossfreebalance=False, moe_first_dense_layers=1))
    layers = moe_layers(model)
    assert len(layers) == 1 and "moe/L1/bias_max" in moe_metrics(model)  # labelled by block index
    idx = torch.randint(0, 64, (2, 16))
    model.eval()
    model(idx)
    assert not layers[0].tokens_per_expert.any()
    model.train()
    model(idx)
    model(idx)  # two micro-batches in one step
    assert layers[0].tokens_per_expert.sum() == 2 * 2 * 16 * 2  # micro-batches * tokens * active experts
    update_moe_biases(model)
    assert not layers[0].expert_bias.any()
    assert moe_metrics(model)["moe/L1/imbalance"] >= 1.0


def test_sequence_balance_loss():
    model = build_model(small_cfg(moe_aux_loss_alpha=0.1, moe_score_func="softmax"))
    for layer in moe_layers(model):
        with torch.no_grad():
            layer.gate.weight.zero_()  # uniform scores: sum_i f_i * P_i = 1 exactly, whatever is chosen
    idx = torch.randint(0, 64, (3, 16))
    model(idx)
    torch.testing.assert_close(moe_aux_loss(model), torch.tensor(0.2))  # 2 layers * alpha
    torch.manual_seed(5)
    for layer in moe_layers(model):
        torch.nn.init.normal_(layer.gate.weight, 0.0, 0.5)
    model(idx)
    moe_aux_loss(model).backward()
    assert moe_layers(model)[0].gate.weight.grad.abs().sum() > 0  # the loss reaches the router
    model.eval()
    model(idx)
    assert moe_aux_loss(model).item() == 0.0
    off = build_model(small_cfg())
    off(idx)
    assert moe_aux_loss(off).item() == 0.0
    assert moe_aux_loss(build_model(small_cfg(use_moe=False))).item() == 0.0


def train_skewed(lossfree: bool, steps: int = 200) -> tuple[float, float]:
    """Train an MoE model whose routers all favour expert 0; (imbalance at start, over the last 20 steps)."""
    torch.manual_seed(0)
    model = build_model(small_cfg(use_lossfreebalance=lossfree, moe_bias_update_rate=1e-2))  # 10x the
    # paper's gamma, so the bias crosses the skew in ~50 steps rather than ~500
    with torch.no_grad():
        shared = torch.randn(32)
        shared /= shared.norm()
        model.tok_embeddings.weight += 0.1 * shared  # every token carries a common direction ...
        for layer in moe_layers(model):
            layer.gate.weight.normal_(0.0, 0.2)  # spread scores, as a trained router has
            layer.gate.weight[0] += shared  # ... which expert 0's router row is aligned with
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    loads = []
    for _ in range(steps):
        idx = torch.randint(0, 64, (16, 33), generator=gen)
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_moe_biases(model)
        loads.append(torch.stack([layer.last_load for layer in moe_layers(model)]))  # (L, E)
    start = (loads[0].max(-1).values / loads[0].mean(-1)).max().item()
    window = torch.stack(loads[-20:]).sum(0)  # (L, E): 20 steps, so one step's noise does not decide
    return start, (window.max(-1).values / window.mean(-1)).max().item()


def test_lossfree_bias_balances_a_skewed_router():
    start, end = train_skewed(lossfree=True)
    assert start > 3.0
    assert end < 1.3


def test_without_lossfree_the_skew_stays():
    start, end = train_skewed(lossfree=False)
    assert start > 3.0
    assert end > 2.0


def test_moe_transformer_learns_a_repeating_pattern():
    torch.manual_seed(0)
    model = build_model(small_cfg(moe_shared_expert=True, moe_aux_loss_alpha=1e-4))
    pattern = torch.randperm(64)[:12]  # a cycle of 12 tokens; the next token is always determined
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        starts = torch.randint(0, 12, (16, 1))
        idx = pattern[(starts + torch.arange(33)) % 12]  # (16, 33)
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        (loss + moe_aux_loss(model)).backward()
        opt.step()
        update_moe_biases(model)
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_config_update_builds_moe_model():
    cfg = ModelConfig(num_layers=2, num_dims=32, num_heads=2, vocab_size=64, seq_len=16).update(
        {"use_moe": True, "moe_num_experts": 4, "moe_active_experts": 2, "use_lossfreebalance": True}
    )
    model = build_model(cfg)
    layers = moe_layers(model)
    assert len(layers) == 2 and layers[0].num_experts == 4 and layers[0].active_experts == 2
    assert layers[0].lossfree_balance
    assert model(torch.randint(0, 64, (2, 8))).shape == (2, 8, 64)
