"""How good a model a budget buys: a data-constrained scaling law ranks the shapes the planner considers.

    loss(N, D, U) = E + A / N'^ALPHA + B / D'^BETA                 Hoffmann et al. 2022 (Chinchilla, approach 3)
    D' = U + U * R_D * (1 - exp(-(D/U - 1) / R_D))    for D > U    Muennighoff et al. 2023, "Scaling
    N' = U_N + U_N * R_N * (1 - exp(-(N/U_N - 1) / R_N))  for N > U_N   Data-Constrained Language Models"

N parameters trained on D tokens drawn from U unique ones. Repeated tokens are worth less each epoch (their
value decays with an e-folding of R_D = 15.4 repetitions), and parameters beyond U_N, the compute-optimal
size for U tokens, are worth less too (R_N = 5.3), so with little data the best model is smaller and sees
the data more often. The absolute numbers are those of the papers' corpora and tokenizers, not ours: the
planner uses the law only to compare shapes on one corpus, where its shape (the trade of N against D) is
what matters.
"""

from __future__ import annotations

import math

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28  # Chinchilla's fit (Hoffmann et al. 2022, eq. 10)
R_D = 15.4  # e-folding of repeated data, in repetitions (Muennighoff et al. 2023, fitted R_D*)
R_N = 5.3  # e-folding of excess parameters (their R_N*)
TOKENS_PER_PARAM = 20  # compute-optimal tokens per parameter (Chinchilla): U_N = U / 20
# What a token trained with each optimizer is worth in AdamW's tokens, which the law was fitted with. Muon's
# from `python -m pufferfish.lab.isoflop` (docs/benchmarks.md, tokens per parameter by optimizer): at the same
# compute its best model is 1.64x AdamW's, and with N* ~ k^(BETA / (ALPHA + BETA)) that is k = 1.64^2.21 ~ 3
TOKEN_WORTH = {"adamw": 1.0, "muon": 3.0}


def effective_tokens(tokens: float, unique: float) -> float:
    """D': what `tokens` drawn from `unique` fresh ones are worth in fresh tokens."""
    if tokens <= unique:
        return tokens
    return unique + unique * R_D * (1 - math.exp(-(tokens / unique - 1) / R_D))


def effective_params(params: float, unique: float) -> float:
    """N': parameters beyond the compute-optimal size for the unique tokens are worth less."""
    useful = max(1.0, unique / TOKENS_PER_PARAM)
    if params <= useful:
        return params
    return useful + useful * R_N * (1 - math.exp(-(params / useful - 1) / R_N))


def predicted_loss(params: float, tokens: float, unique: float = math.inf) -> float:
    """The law's loss of `params` parameters trained on `tokens` tokens of which `unique` are distinct."""
    n = effective_params(params, unique) if math.isfinite(unique) else params
    d = effective_tokens(tokens, unique) if math.isfinite(unique) else tokens
    return E + A / max(n, 1.0) ** ALPHA + B / max(d, 1.0) ** BETA


def epochs_worth_training(gain: float = 0.25) -> float:
    """Epochs after which one more is worth under `gain` of an epoch of fresh text: past this, a run is better
    ended (its schedule complete) or spent on a larger model than on repeating the data again."""
    # dD'/dD = exp(-(D/U - 1) / R_D) < gain  <=>  D/U > 1 + R_D ln(1/gain)
    return 1 + R_D * math.log(1 / gain)
