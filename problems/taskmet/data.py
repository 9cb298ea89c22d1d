"""The three predict-then-optimise problems: data, decisions and objective.

Each instance has m items; the features are X [I, m, d], the labels Y [I, m, o] (o outputs
per item) and aux holds per-instance extras (the portfolio covariance). Splits: train, val, test.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from solvers import decision_layers as dl

D = torch.float64


@dataclass
class Task:
    """One problem. decide_train is the differentiable training layer, decide_test the exact
    decision used for scores; objective(y, z, aux) -> [I] is maximised."""

    name: str
    data: str
    X: dict
    Y: dict
    aux: dict
    decide_train: object
    decide_test: object
    objective: object
    hidden: int  # predictor hidden width (0: linear model)
    out_act: str  # predictor output activation: 'none', 'sigmoid', 'tanh'
    lr: float  # predictor learning rate
    extra: dict = field(default_factory=dict)


def _split(X, Y, aux, n_train, n_val, val_first=True):
    """First n_train instances for training (validation first, as published, or last for time
    series), the rest for test."""
    if val_first:
        cut = {"val": slice(0, n_val), "train": slice(n_val, n_train), "test": slice(n_train, None)}
    else:
        cut = {"train": slice(0, n_train - n_val), "val": slice(n_train - n_val, n_train),
               "test": slice(n_train, None)}
    return ({k: X[s] for k, s in cut.items()}, {k: Y[s] for k, s in cut.items()},
            {k: (None if aux is None else aux[s]) for k, s in cut.items()})


# ----------------------------------------------------------------------------- Cubic
def _cubic_soft_top1(y, eps):
    """Soft top-1 whose temperature follows the published layer: entropic OT with the cost
    normalised by its per-instance maximum, i.e. temperature eps * (max|y| + 1)^2 / 2 on y."""
    s = y[..., 0]
    return dl.soft_topk(s, 1, eps * (s.detach().abs().amax(-1, keepdim=True) + 1) ** 2 / 2)


def cubic(seed, n_train=400, n_test=400, n_items=50, val_frac=0.5, eps=0.01):
    """y = 10 (x^3 - 0.65 x), x ~ U[-1, 1], 50 items per instance, pick the top 1 (as published)."""
    g = torch.Generator().manual_seed(seed)
    X = 2 * torch.rand(n_train + n_test, n_items, 1, generator=g, dtype=D) - 1
    Y = 10 * (X ** 3 - 0.65 * X)
    Xs, Ys, aux = _split(X, Y, None, n_train, int(val_frac * n_train))
    return Task("cubic", "synthetic cubic (as published)", Xs, Ys, aux,
                decide_train=lambda y, a: _cubic_soft_top1(y, eps),
                decide_test=lambda y, a: dl.hard_topk(y[..., 0], 1),
                objective=lambda y, z, a: (y[..., 0] * z).sum(-1),
                hidden=0, out_act="none", lr=0.1)


# ----------------------------------------------------------------------------- Budget
def budget(seed, n_train=100, n_test=500, n_channels=5, n_users=10, n_fake=10, val_frac=0.2,
           budget=2.0, reg=3.0):
    """Budget allocation (Wilder et al. 2019) on SYNTHETIC click probabilities.

    The published Yahoo data cannot be had offline. Y_ij = sigmoid(c_i + e_ij - 1.5), channel
    effect c_i ~ N(0, 1), e_ij ~ N(0, 1), in (0, 1). Features as published: the per-channel
    standardised labels with n_fake Gaussian noise columns, through one fixed random linear map
    to n_users features. reg: the training layer's smoothing (budget_allocation); 3 exceeds the
    objective's typical curvature along the budget constraint, so training decisions move with
    the predictions instead of sitting at vertices (reg 1 left DFL(0) with zero gradients).
    """
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    c = torch.randn(n, n_channels, 1, generator=g, dtype=D)
    Y = torch.sigmoid(c + torch.randn(n, n_channels, n_users, generator=g, dtype=D) - 1.5)
    Ystd = (Y - Y.mean((0, 1))) / Y.std((0, 1))
    noise = torch.randn(n, n_channels, n_fake, generator=g, dtype=D)
    W = torch.randn(n_users + n_fake, n_users, generator=g, dtype=D) / (n_users + n_fake) ** 0.5
    X = torch.cat([Ystd, noise], -1) @ W
    Xs, Ys, aux = _split(X, Y, None, n_train, int(val_frac * n_train))
    return Task("budget", f"synthetic Y (sigmoid channel+noise model, {n_fake} noise features; "
                "published Yahoo data not available offline)", Xs, Ys, aux,
                decide_train=lambda y, a: dl.budget_allocation(y, budget, reg=reg, ridge=1e-6),
                decide_test=lambda y, a: dl.budget_allocation(y.detach(), budget),
                objective=lambda y, z, a: dl.budget_objective(y, z),
                hidden=32, out_act="sigmoid", lr=1e-3)


# ----------------------------------------------------------------------------- Portfolio
def _price_features(close):
    """Published per-stock features (returns over several lags, rolling means/variances) from a
    [T, S] price frame; returns features [T, S, 27], next-day return [T, S], next 2..10 [T, S, 9]."""
    import pandas as pd
    ret = close.pct_change()
    cols = [ret] + [ret.shift(i) for i in range(1, 11)]
    cols += [close.pct_change(w) for w in (365, 120, 30, 7)]
    cols += [ret.rolling(7).mean(), ret.rolling(7).var()]
    for w in (365, 120, 30, 7, 3):
        r = close.rolling(w)
        cols += [r.mean(), r.var()]
    feats = np.stack([c.to_numpy() for c in cols], -1)
    fut = np.stack([ret.shift(-i).to_numpy() for i in range(1, 11)], -1)
    ok = np.isfinite(feats).all((1, 2)) & np.isfinite(fut).all((1, 2))
    return feats[ok], fut[ok, :, 0], fut[ok, :, 1:], pd.Index(close.index[ok])


def _load_prices():
    from skfolio.datasets import load_sp500_dataset
    return load_sp500_dataset().loc["2004-01-01":]


def _factor_prices(seed, T=1400, S=20, k=3):
    import pandas as pd
    g = np.random.default_rng(seed)
    f = g.normal(0, 0.01, (T, k))
    ret = f @ g.normal(0, 1, (k, S)) + g.normal(0, 0.01, (T, S)) + 1e-4
    return pd.DataFrame(100 * np.exp(np.cumsum(np.log1p(ret), 0)))


def portfolio(seed, n_train=400, n_test=400, val_frac=0.5, gamma=0.1, reg=0.1, qp="torch",
              source="skfolio"):
    """Portfolio choice: max p^T x - gamma x^T Sigma x on the simplex, p the next-day returns.

    Prices: the 20 S&P 500 stocks shipped with skfolio (daily, from 2004), or a 3-factor model
    when that fails (source='factor' forces it). Features and target as published (Shah et al.
    2022); Sigma = correlation of the next 2..10 daily returns + reg I (as published). The
    seed only enters the predictor's initialisation (the data are fixed days).
    """
    data = "skfolio S&P 500 daily prices (20 stocks, from 2004-01-01)"
    close = None
    if source == "skfolio":
        try:
            close = _load_prices()
        except Exception as e:  # no network and no cache: fall back
            data = f"3-factor model prices (skfolio data unavailable: {type(e).__name__})"
    if close is None:
        data = data if source == "skfolio" else "3-factor model prices (20 stocks)"
        close = _factor_prices(seed)
    feats, target, fut, dates = _price_features(close)
    n = n_train + n_test
    if len(dates) < n:
        raise ValueError(f"portfolio data has {len(dates)} usable days, need {n}")
    feats, target, fut = feats[:n], target[:n], fut[:n]
    flat = feats.reshape(-1, feats.shape[-1])
    feats = (feats - flat.mean(0)) / (flat.std(0) + 1e-12)
    fm = fut - fut.mean(-1, keepdims=True)
    fm = fm / np.sqrt((fm ** 2).mean(-1, keepdims=True))
    corr = np.einsum("tsk,tuk->tsu", fm, fm) / (fut.shape[-1] - 1)
    Sigma = torch.tensor(corr, dtype=D) + reg * torch.eye(corr.shape[-1], dtype=D)
    X, Y = torch.tensor(feats, dtype=D), torch.tensor(target, dtype=D).unsqueeze(-1)
    Xs, Ys, aux = _split(X, Y, Sigma, n_train, int(val_frac * n_train), val_first=False)
    train_layer = dl.portfolio_qp if qp == "torch" else dl.portfolio_qp_cvxpylayers
    return Task("portfolio", data + f"; days {dates[0].date()}..{dates[n - 1].date()}", Xs, Ys, aux,
                decide_train=lambda y, a: train_layer(y[..., 0], a, gamma),
                decide_test=lambda y, a: dl.portfolio_qp(y[..., 0].detach(), a, gamma),
                objective=lambda y, z, a: dl.portfolio_objective(y[..., 0], z, a, gamma),
                hidden=32, out_act="tanh", lr=1e-2)


PROBLEMS = {"cubic": cubic, "budget": budget, "portfolio": portfolio}
