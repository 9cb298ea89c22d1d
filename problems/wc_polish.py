"""Exact minimisation of log D_wc = max log r - min log r (r = d / d_G) by proximal bundle steps.

The smooth losses of embeddings.py (soft maxima at tau > 0) stop short of the worst-case optimum: their
minimiser weighs every near-worst pair, and at a tau small enough not to matter their gradients are too stiff
for Adam. `polish_wc` works on the nonsmooth objective itself. Each step linearises log r of the active
pairs (the most stretched S and most contracted C, gradients g_k by autograd, also through a solver's
implicit gradient) and takes the proximal step of the piecewise-linear model

    delta = argmin_delta  max_{k in S} (a_k + g_k . delta) - min_{l in C} (a_l + g_l . delta)
                          + |delta|^2_{D^-1} / (2 rho),

(D a diagonal scale on the parameters) through its dual, a quadratic programme over two simplices:
delta = -rho D M^T w with rows M = [g_S; -g_C]. |D^(1/2) M^T w| at the dual optimum measures
stationarity (it vanishes at a Clarke stationary point of log D_wc in the parameters). A step is kept when
the exact objective on all pairs falls by at least ACCEPT times the model's prediction; rho doubles after
a step that gains at least 3/4 of the prediction and shrinks 4 times after a rejected one.
"""
import math
import warnings

import cvxpy as cp
import numpy as np
import torch

import bilevel

from .report import progress

ACCEPT = 0.1  # the least actual / predicted decrease of a kept step
QP_SOLVERS = ("CLARABEL", "OSQP")  # the dual QP's solvers (cvxpy names), tried in this order
STATIONARY = 1e-13  # stationary to rounding, stop: predicted decrease below it, stationarity below its root


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def _assign(params, vec):
    with torch.no_grad():
        at = 0
        for p in params:
            p.copy_(vec[at:at + p.numel()].view_as(p))
            at += p.numel()


def _log_ratios(model, pairs, log_dg):
    """(log r [P] of every pair, without gradient; the model's non-converged count)."""
    with torch.no_grad():
        d = model(pairs)
    return torch.log(d) - log_dg, getattr(model, "last_nonconverged", 0)


def _flat_grads(params, grads, lead=()):
    return torch.cat([torch.zeros(*lead, p.numel(), dtype=torch.float64) if g is None else g.reshape(*lead, -1)
                      for p, g in zip(params, grads)], -1)


def _gradients(model, params, pairs, log_dg):
    """Jacobian [K, n] of log r of pairs [K, 2] in the flattened params: one vectorised backward
    (is_grads_batched) where every op allows it; else, e.g. through the implicit log map's autograd
    Function, one pair per forward and backward (a batched forward would redo all K implicit solves in
    each row's backward)."""
    log_r = torch.log(model(pairs)) - log_dg
    try:
        eye = torch.eye(len(pairs), dtype=log_r.dtype)
        grads = torch.autograd.grad(log_r, params, eye, is_grads_batched=True, allow_unused=True)
        return _flat_grads(params, grads, (len(pairs),))
    except RuntimeError:  # an op without a batching rule
        pass
    rows = []
    for k in range(len(pairs)):
        lk = torch.log(model(pairs[k:k + 1]))[0] - log_dg[k]
        rows.append(_flat_grads(params, torch.autograd.grad(lk, params, allow_unused=True)))
    return torch.stack(rows)


def _active(log_r, eps, k_max):
    """Indices of the stretched pairs within eps of the largest log r and of the contracted ones within eps of
    the smallest, at most k_max each (the most extreme first)."""
    order = torch.argsort(log_r)
    top, bottom = order.flip(0)[:k_max], order[:k_max]
    return top[log_r[top] >= log_r[top[0]] - eps], bottom[log_r[bottom] <= log_r[bottom[0]] + eps]


def _prox_step(a_s, a_c, M, rho, scale):
    """The proximal bundle step (module docstring) for log r a_s [S] (stretched), a_c [C] (contracted) and
    rows M [S + C, n] = [g_S; -g_C] -> (delta [n], model value at delta, stationarity |D^(1/2) M^T w|)."""
    M, D = M.numpy(), scale.numpy()
    ns = len(a_s)
    c = np.concatenate([a_s.numpy() - float(a_s.max()), float(a_c.min()) - a_c.numpy()])  # shifts: same argmax
    Q = (M * D) @ M.T
    q = max(float(np.diag(Q).mean()), 1e-300)  # Q / q has unit mean diagonal: better conditioned QPs
    w = cp.Variable(len(c), nonneg=True)
    prob = cp.Problem(cp.Maximize(c @ w - 0.5 * rho * q * cp.quad_form(w, cp.psd_wrap(Q / q))),
                      [cp.sum(w[:ns]) == 1, cp.sum(w[ns:]) == 1])
    for solver in QP_SOLVERS:
        try:
            with warnings.catch_warnings():  # "may be inaccurate": harmless, each step is checked on the exact D_wc
                warnings.simplefilter("ignore", UserWarning)
                prob.solve(solver=solver)
        except cp.error.SolverError:
            continue
        if w.value is not None:
            break
    else:
        raise RuntimeError(f"polish_wc: the bundle QP failed with every solver of {QP_SOLVERS} ({prob.status})")
    direction = M.T @ np.clip(w.value, 0, None)
    delta = -rho * D * direction
    value = float((a_s.numpy() + M[:ns] @ delta).max() - (a_c.numpy() - M[ns:] @ delta).min())
    return torch.from_numpy(delta), value, float(np.sqrt(direction @ (D * direction)))


def polish_wc(model, pairs, d_graph, *, params=None, steps=300, rho=1e-3, eps=0.05, k_max=200, scale=None,
              history=None, min_rho=1e-10, desc="polish D_wc"):
    """Lower the exact D_wc of model (pairs [P, 2] -> distances [P]; `last_nonconverged`, if its solver
    can fail) over params (default: its trainable parameters) by at most `steps` proximal bundle steps
    (module docstring), from proximal weight rho. eps, k_max: the active sets (pairs within eps of the
    extreme log r, at most k_max a side); scale: an optional positive [n] diagonal metric D on the
    flattened params. A step is kept only when D_wc falls and every distance converged, so the model
    ends at its best iterate. Stops early: quietly at a stationary point (predicted decrease below
    STATIONARY, stationarity below its square root), with a bilevel.ConvergenceWarning when rho falls below min_rho,
    and (with a RuntimeWarning) at a point where some log r has no finite gradient (e.g. antipodal
    points on a sphere). history: an optional list that gets a dict per trial step (step, d_wc, rho,
    stationarity, accepted, predicted and actual decrease of log D_wc, nonconverged). Returns D_wc."""
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    log_dg = torch.log(torch.as_tensor(d_graph, dtype=torch.float64))
    n = sum(p.numel() for p in params)
    scale = torch.ones(n, dtype=torch.float64) if scale is None else torch.as_tensor(scale, dtype=torch.float64)
    if scale.shape != (n,) or not bool((scale > 0).all()):
        raise ValueError(f"polish_wc: scale must be positive of shape [{n}], got {tuple(scale.shape)}")
    log_r, bad = _log_ratios(model, pairs, log_dg)
    if bad:
        raise ValueError(f"polish_wc: {bad} distances did not converge at the start")
    f = float(log_r.max() - log_r.min())
    history = [] if history is None else history
    for t in progress(range(steps), desc=desc, leave=False):
        s, c = _active(log_r, eps, k_max)
        G = _gradients(model, params, pairs[torch.cat([s, c])], log_dg[torch.cat([s, c])])
        if not bool(torch.isfinite(G).all()):
            warnings.warn(f"{desc}: some active pair has no finite gradient at step {t} (antipodal points?); "
                          "stopping there", RuntimeWarning, stacklevel=2)
            break
        x0, kept = _flat(params), False
        M = torch.cat([G[:len(s)], -G[len(s):]])
        while not kept and rho >= min_rho:
            delta, value, stat = _prox_step(log_r[s], log_r[c], M, rho, scale)
            predicted = f - value
            if predicted <= STATIONARY and stat <= math.sqrt(STATIONARY):
                return _finish(model, pairs, log_dg, f)
            _assign(params, x0 + delta)
            new_log_r, bad = _log_ratios(model, pairs, log_dg)
            f_new = math.inf if bad else float(new_log_r.max() - new_log_r.min())
            kept = predicted > 0 and f - f_new > ACCEPT * predicted
            history.append({"step": t, "d_wc": math.exp(min(f, f_new)), "rho": rho, "stationarity": stat,
                            "accepted": kept, "predicted": predicted, "actual": f - f_new, "nonconverged": bad})
            if kept:
                rho *= 2 if f - f_new > 0.75 * predicted else 1
                f, log_r = f_new, new_log_r
            else:
                _assign(params, x0)
                rho /= 4
        if not kept:
            warnings.warn(f"{desc}: no step lowered D_wc ({math.exp(f):.8g}) at step {t}, down to rho {min_rho:g}",
                          bilevel.ConvergenceWarning, stacklevel=2)
            break
    return _finish(model, pairs, log_dg, f)


def _finish(model, pairs, log_dg, f):
    _log_ratios(model, pairs, log_dg)  # the model's solver caches back at the kept parameters
    return math.exp(f)
