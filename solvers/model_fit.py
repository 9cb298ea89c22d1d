"""Fit a model's parameters to an inner loss and differentiate the fit in the loss's parameters.

The inner variable is the predictor's parameter dict (``torch.func.functional_call`` style);
the outer parameters phi (e.g. a learned metric) enter the loss. The fitted parameters are
returned attached to phi either implicitly (engine: grad_params loss = 0, solved by CG on
Hessian-vector products) or by unrolling gradient descent through ``bilevel.iterate``.
"""
import torch

import bilevel


def _detach(tree):
    return torch.utils._pytree.tree_map(lambda t: t.detach(), tree)


def adam(loss, params, phi, steps, lr, betas=(0.9, 0.999), eps=1e-8):
    """Minimise loss(params, phi) over the dict params with Adam, no graph to phi; returns a new dict."""
    gfn = torch.func.grad(loss)
    phi = _detach(phi)
    p = _detach(params)
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    b1, b2 = betas
    with torch.no_grad():
        for t in range(1, steps + 1):
            g = gfn(p, phi)
            for k in p:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
                p[k] = p[k] - lr * (m[k] / (1 - b1 ** t)) / ((v2[k] / (1 - b2 ** t)).sqrt() + eps)
    return p


def fit(loss, params, phi, *, steps, lr, backward="implicit", solve="cg", ridge=0.0, maxiter=100,
        tol=None, residual_tol=None):
    """Minimise loss(params, phi) over params from the given (warm) start; return params*(phi).

    loss: callable(params: dict, phi: tree) -> scalar, differentiable by torch.func.
    backward: 'implicit' runs Adam (steps, lr) without a graph, then attaches the result to phi
        through grad_params loss = 0, solved by `solve` (default CG on Hessian-vector products;
        ridge damps a Hessian that is only semidefinite); 'unrolled' runs `steps` gradient-descent
        steps of size lr and backpropagates through all of them (bilevel.iterate).
    """
    if backward == "implicit":
        p = adam(loss, params, phi, steps, lr)
        return bilevel.implicit_root(torch.func.grad(loss), p, phi, solve=solve, ridge=ridge,
                                     maxiter=maxiter, tol=tol, residual_tol=residual_tol)
    if backward == "unrolled":
        gfn = torch.func.grad(loss)

        def step(p, phi):
            g = gfn(p, phi)
            return {k: p[k] - lr * g[k] for k in p}

        return bilevel.iterate(step, _detach(params), phi, steps, backward="unrolled")
    raise ValueError(f"backward must be 'implicit' or 'unrolled', got {backward!r}")
