"""The four ways to train the per-item predictor: MSE, DFL, LODL and TaskMet.

One predictor (linear or a 2-layer MLP) maps an item's features [d] to its labels [o] and is
shared by all items. Decisions are batched over instances. Model selection on the validation
split: MSE keeps its checkpoint with the lowest validation MSE, the decision-focused methods
(DFL, LODL, TaskMet) the one with the highest validation decision objective (test-time
decisions). The untrained initial model is never selected; TaskMet's step 0 (the model fitted
under the initial metric, before any metric step) is a candidate, as in the reference code.
"""
import math
import time

import torch
from torch import nn
from torch.func import functional_call

from solvers.model_fit import adam, fit

from ..report import progress
from .score import decision_quality

ACT = {"none": lambda t: t, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
METHODS = ("mse", "dfl", "lodl", "taskmet")


def make_net(d, o, hidden, seed):
    """Linear(d, o) when hidden == 0, else Linear-ReLU-Linear; float64, seeded init."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Linear(d, o) if hidden == 0 else nn.Sequential(nn.Linear(d, hidden), nn.ReLU(),
                                                                 nn.Linear(hidden, o))
    return net.double()


def predict(task, net, params, X):
    """Predictions [..., m, o] for features [..., m, d]."""
    return ACT[task.out_act](functional_call(net, params, (X,)))


def _params(net):
    return {k: v.detach().clone() for k, v in net.named_parameters()}


@torch.no_grad()
def val_objective(task, net, params, split="val"):
    """Mean decision objective of the test-time decisions on a split (higher is better)."""
    y, aux = task.Y[split], task.aux[split]
    return float(task.objective(y, task.decide_test(predict(task, net, params, task.X[split]), aux), aux).mean())


@torch.no_grad()
def val_neg_mse(task, net, params, split="val"):
    return -float(((predict(task, net, params, task.X[split]) - task.Y[split]) ** 2).mean())


def _take(task, split, idx):
    aux = task.aux[split]
    return task.X[split][idx], task.Y[split][idx], None if aux is None else aux[idx]


def _decision_loss(task, yhat, y, aux):
    return -task.objective(y, task.decide_train(yhat, aux), aux).mean()


class _Best:
    """Keeps the parameters with the highest validation objective."""

    def __init__(self):
        self.value, self.params, self.step = -math.inf, None, -1

    def offer(self, value, params, step):
        if value > self.value:
            self.value, self.params, self.step = value, {k: v.detach().clone() for k, v in params.items()}, step


# ----------------------------------------------------------------------------- LODL surrogates
@torch.no_grad()
def fit_lodl(task, *, n_samples=256, rank=20, steps=500, noise=0.5, lr=0.05, seed=0):
    """Per-instance quadratic surrogates of the regret, q_i(yhat) = c_i d^T (diag(w_i) + L_i L_i^T) d,
    d = (yhat - y_i) / s (n = m*o coordinates, L_i [n, r], r = min(rank, n)), fitted by least
    squares to the regrets of n_samples Gaussian perturbations yhat = y + s N(0, I),
    s = noise * std(y), batched over instances. The diagonal part, linear in w, is solved
    exactly (an Adam fit of it stayed near uniform weights and Cubic's LODL failed on 2 of 3
    seeds); then L by Adam on the residual. The diagonal part is identifiable from a few hundred
    samples where the rank-r part alone (n*r numbers) is not. The noise must be small enough
    that the regret singles out the items that matter (Cubic: 0.1; at 0.5 every item's weight
    came out about equal and LODL fit like MSE).
    Returns (w [I, n], L [I, n, r], c [I], s)."""
    y, aux = task.Y["train"], task.aux["train"]
    I, shape = y.shape[0], y.shape[1:]
    n = shape.numel()
    s = noise * float(y.std())
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(I, n_samples, n, generator=g, dtype=y.dtype)
    yhat = (y.reshape(I, 1, n) + s * d).reshape(I * n_samples, *shape)
    yrep = y.repeat_interleave(n_samples, 0)
    arep = None if aux is None else aux.repeat_interleave(n_samples, 0)
    best = task.objective(y, task.decide_test(y, aux), aux)
    got = task.objective(yrep, task.decide_test(yhat, arep), arep).reshape(I, n_samples)
    regret = (best[:, None] - got).clamp_min(0)
    c = regret.mean(1).clamp_min(1e-12)
    target = regret / c[:, None]
    # diagonal part: linear least squares in w, batched normal equations (a relative ridge for
    # n_samples < n), clamped at 0 so that the surrogate stays convex
    d2 = d * d
    gram = d2.transpose(-1, -2) @ d2
    ridge = 1e-8 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    w = torch.linalg.solve(gram + ridge * torch.eye(n, dtype=y.dtype),
                           d2.transpose(-1, -2) @ target.unsqueeze(-1))[..., 0].clamp_min(0)
    # rank-r part: Adam on what the diagonal part leaves
    rest = target - (d2 @ w.unsqueeze(-1))[..., 0]
    r = min(rank, n)
    L = (1e-2 * torch.randn(I, n, r, generator=g, dtype=y.dtype) / math.sqrt(n * r)).requires_grad_()
    opt = torch.optim.Adam([L], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            loss = ((((d @ L) ** 2).sum(-1) - rest) ** 2).mean()
            opt.zero_grad()
            loss.backward()
        opt.step()
    return w, L.detach(), c, s


def lodl_loss(yhat, y, w, L, c, s):
    """Mean over instances of the fitted surrogates at yhat [I, m, o]."""
    dlt = (yhat - y).reshape(y.shape[0], -1) / s
    return (c * ((w * dlt * dlt).sum(-1) + ((dlt.unsqueeze(-2) @ L) ** 2).sum((-1, -2)))).mean()


# ----------------------------------------------------------------------------- MSE / DFL / LODL
def train_direct(task, method, alpha, seed, *, epochs, batch, lodl=None, wd=0.0):
    """Minibatch Adam on the method's loss: mse, dfl (-obj + alpha mse), lodl (surrogate + alpha mse).
    lodl: the fitted surrogates (fit_lodl's output), needed for method 'lodl'. wd: weight decay
    (the gradient of wd/2 |theta|^2, as in TaskMet's inner fit; 0 as published)."""
    X, Y = task.X["train"], task.Y["train"]
    net = make_net(X.shape[-1], Y.shape[-1], task.hidden, seed)
    params = {k: v.requires_grad_() for k, v in _params(net).items()}
    opt = torch.optim.Adam(params.values(), lr=task.lr, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    if method == "lodl":
        w, L, c, s = lodl
    best, step = _Best(), 0
    score = val_neg_mse if method == "mse" else val_objective
    for _ in progress(range(epochs), desc=f"{task.name} {method}", leave=False):
        for idx in torch.randperm(X.shape[0], generator=g).split(batch):
            x, y, aux = _take(task, "train", idx)
            yhat = predict(task, net, params, x)
            mse = ((yhat - y) ** 2).mean()
            if method == "mse":
                loss = mse
            elif method == "dfl":
                loss = _decision_loss(task, yhat, y, aux) + alpha * mse
            elif method == "lodl":
                loss = lodl_loss(yhat, y, w[idx], L[idx], c[idx], s) + alpha * mse
            else:
                raise ValueError(f"unknown method {method!r}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        best.offer(score(task, net, params), params, step)
    return net, best


# ----------------------------------------------------------------------------- TaskMet
def make_metric(d, o, hidden, seed):
    """Metric network x [.., d] -> L [.., o*o]; A(x) = L L^T + e^s I with the scalar s in phi."""
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, o * o)).double()


def weighted_mse(task, net, params, Lm, s):
    """Mean over training items of r^T (Lm Lm^T + s I) r, r = prediction - label; Lm [I, m, o, o]."""
    r = predict(task, net, params, task.X["train"]) - task.Y["train"]
    return (((r.unsqueeze(-2) @ Lm) ** 2).sum(-1)[..., 0] + s * (r * r).sum(-1)).mean()


def l2(params):
    """Sum of squares of all parameters (the inner problem's weight decay is wd/2 * l2)."""
    return sum((v * v).sum() for v in params.values())


def metric_factor(metric, phi, X, o, ref=None):
    """(L [..., o, o], c) with A_phi(x) = L L^T + c I for features X [..., d] (c = e^s), both
    divided by the mean of tr(A)/o over the reference features ref (default X): the fitted
    model does not depend on the metric's scale, so this fixes the scale and keeps the inner
    Hessian's scale, and the ridge relative to it, steady while the metric learns."""
    def raw(Z):
        return functional_call(metric, phi["net"], (Z,)).reshape(*Z.shape[:-1], o, o)

    Lm, c = raw(X), phi["log_s"].exp()
    Lr = Lm if ref is None else raw(ref)
    scale = (Lr ** 2).sum((-1, -2)).mean() / o + c
    return Lm / scale.sqrt(), c / scale


def train_taskmet(task, seed, *, outer_steps, inner_init=500, inner_steps=100, metric_lr=1e-3,
                  metric_hidden=200, wd=0.0, backward="implicit", solve="cg", ridge=1e-3, cg_iters=50,
                  eval_every=5):
    """TaskMet: learn the metric so that the predictor fitted under it makes good decisions.

    Inner: Adam on the metric-weighted MSE + wd/2 |theta|^2 (inner_init steps, then inner_steps
    warm-started per outer step). wd > 0 gives an MLP's inner problem a minimiser that further
    steps do not drift away from (unregularised, the refits kept overfitting: on Portfolio the
    test MSE grew 8x over 2000 refit steps with the metric frozen), and adds wd I to the Hessian
    that the backward solve inverts. Outer: Adam (metric_lr) on -obj of the training decisions,
    gradient through the fit by implicit differentiation (CG on Hessian-vector products) or
    unrolling. Validation every eval_every outer steps and at step 0.
    """
    X, Y = task.X["train"], task.Y["train"]
    d, o = X.shape[-1], Y.shape[-1]
    net = make_net(d, o, task.hidden, seed)
    metric = make_metric(d, o, metric_hidden, seed)
    phi = {"net": {k: v.requires_grad_() for k, v in _params(metric).items()},
           "log_s": torch.zeros((), dtype=X.dtype, requires_grad=True)}
    leaves = [*phi["net"].values(), phi["log_s"]]
    opt = torch.optim.Adam(leaves, lr=metric_lr)
    def loss(params, phi):
        return weighted_mse(task, net, params, *metric_factor(metric, phi, X, o)) + wd / 2 * l2(params)

    def fixed_metric_loss(params, phi):  # the same loss with A precomputed (phi frozen)
        return weighted_mse(task, net, params, *phi) + wd / 2 * l2(params)

    with torch.no_grad():
        params = adam(fixed_metric_loss, _params(net), metric_factor(metric, phi, X, o), inner_init, task.lr)
    best = _Best()
    best.offer(val_objective(task, net, params), params, 0)
    aux = task.aux["train"]
    for step in progress(range(1, outer_steps + 1), desc=f"{task.name} taskmet", leave=False):
        if backward == "implicit":  # warm-started Adam with A frozen, then attach through grad = 0
            with torch.no_grad():
                params = adam(fixed_metric_loss, params, metric_factor(metric, phi, X, o), inner_steps, task.lr)
        p_star = fit(loss, params, phi, steps=0 if backward == "implicit" else inner_steps, lr=task.lr,
                     backward=backward, solve=solve, ridge=ridge, maxiter=cg_iters, tol=1e-6,
                     residual_tol=math.inf)
        outer = _decision_loss(task, predict(task, net, p_star, X), Y, aux)
        opt.zero_grad()
        outer.backward()
        opt.step()
        params = {k: v.detach() for k, v in p_star.items()}
        if step % eval_every == 0 or step == outer_steps:
            best.offer(val_objective(task, net, params), params, step)
    return net, best, (metric, {k: v.detach() for k, v in phi["net"].items()}, phi["log_s"].detach())


# ----------------------------------------------------------------------------- run one
def run(task, method, alpha, seed, settings, cache=None):
    """Train one method on one task; returns (scores dict, net, best params, extra).

    settings: {"direct": train_direct options, "taskmet": train_taskmet options, "lodl":
    fit_lodl options}. cache: a dict that keeps LODL surrogates between calls (same task, seed).
    """
    t0 = time.time()
    extra = {}
    if method == "taskmet":
        net, best, metric = train_taskmet(task, seed, **settings["taskmet"])
        extra["metric"] = metric
    elif method in METHODS:
        lodl = None
        if method == "lodl":
            cache = {} if cache is None else cache
            key = (task.name, seed)
            if key not in cache:
                cache[key] = fit_lodl(task, seed=seed, **settings.get("lodl", {}))
            lodl = cache[key]
        net, best = train_direct(task, method, alpha, seed, lodl=lodl, **settings["direct"])
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    with torch.no_grad():
        yhat = predict(task, net, best.params, task.X["test"])
        mse = float(((yhat - task.Y["test"]) ** 2).mean())
        dq = decision_quality(task, yhat, "test")
    return {"problem": task.name, "method": method, "alpha": alpha if method in ("dfl", "lodl") else None,
            "seed": seed, "dq": dq, "mse": mse, "best_step": best.step, "seconds": time.time() - t0,
            "data": task.data}, net, best.params, extra
