"""Define a new bilevel problem and plug in your own inner solver.

Task: some training labels are corrupted. Learn one weight per training sample
(theta, through a sigmoid) so that ridge regression fitted on the weighted data
(inner problem) predicts a clean validation set well (outer problem).

Run: python examples/custom_problem.py
"""
import torch

import bilevel

torch.manual_seed(0)
D = torch.float64
n, n_val, d = 200, 100, 10
w_true = torch.randn(d, dtype=D)
X, Xv = torch.randn(n, d, dtype=D), torch.randn(n_val, d, dtype=D)
y, yv = X @ w_true + 0.1 * torch.randn(n, dtype=D), Xv @ w_true
corrupted = torch.arange(n) < 40
y[corrupted] += 5 * torch.randn(int(corrupted.sum()), dtype=D)


# 1. The optimality condition of the inner problem, as a plain function F(w, theta) = 0.
def inner_loss(w, theta):
    weights = torch.sigmoid(theta)
    return 0.5 * (weights * (X @ w - y) ** 2).mean() + 0.5e-3 * (w ** 2).sum()


F = torch.func.grad(inner_loss)  # dL/dw, zero at the inner solution


# 2. Any inner solver: here a closed-form weighted least-squares solve (no autograd graph).
@bilevel.custom_root(F, solve="cg")
def fit(w_init, theta):
    weights = torch.sigmoid(theta)
    A = X.T @ (weights[:, None] * X) / n + 1e-3 * torch.eye(d, dtype=D)
    return torch.linalg.solve(A, X.T @ (weights * y) / n)


def outer(theta):
    w = fit(torch.zeros(d, dtype=D), theta)
    return 0.5 * ((Xv @ w - yv) ** 2).mean()


def main(steps=150):
    theta = torch.zeros(n, dtype=D)
    # 3. Check the engine's gradient against finite differences before trusting it.
    check = bilevel.check_gradient(outer, theta, n_directions=8)
    print(f"gradient check: max relative error {check.max_rel_err:.2e} -> {'ok' if check else 'FAILED'}")
    theta.requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.1)
    start = float(outer(theta).detach())
    for _ in range(steps):
        opt.zero_grad()
        loss = outer(theta)
        loss.backward()
        opt.step()
    weights = torch.sigmoid(theta.detach())
    end = float(outer(theta).detach())
    print(f"validation loss {start:.3e} -> {end:.3e}")
    print(f"mean weight: corrupted samples {float(weights[corrupted].mean()):.3f}, "
          f"clean samples {float(weights[~corrupted].mean()):.3f}")
    return start, end, weights, bool(check)


if __name__ == "__main__":
    main()
