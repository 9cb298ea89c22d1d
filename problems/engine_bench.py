"""`bilevel bench implicit`: hyper-gradients of per-feature L2 weights in logistic regression.

n = 2000 samples, d = 300 features, theta = log of one L2 weight per feature, inner problem
solved by K steps of gradient descent, outer loss = validation logistic loss. Side by side:
this engine's implicit backward, this engine's unrolled backward, torchopt's custom_root.
Times are medians with the methods interleaved in one process; the memory of each (method, K)
is read in a fresh process (see problems.memory).
"""
import json
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import torch

import bilevel

from .memory import peak_extra_mb
from .registry import register
from .report import emit, table

METHODS = ("implicit", "unrolled", "torchopt")


@dataclass
class LogReg:
    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    theta: torch.Tensor  # log L2 weight per feature
    lr: float

    def grad_inner(self, w, theta):
        """F(w, theta): gradient of the inner objective, [d]."""
        return self.X.T @ (torch.sigmoid(self.X @ w) - self.y) / len(self.y) + theta.exp() * w

    def step(self, w, theta):
        return w - self.lr * self.grad_inner(w, theta)

    def outer(self, w):
        return torch.nn.functional.binary_cross_entropy_with_logits(self.Xv @ w, self.yv)


def make_problem(n=2000, d=300, n_val=1000, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + n_val, d, generator=g, dtype=dtype)
    w_true = torch.randn(d, generator=g, dtype=dtype) / d ** 0.5 * 3
    y = (torch.rand(n + n_val, generator=g, dtype=dtype) < torch.sigmoid(X @ w_true)).to(dtype)
    theta = torch.linspace(-4.6, -2.3, d, dtype=dtype)  # L2 weights from 0.01 to 0.1
    # step 1/L with L >= the largest Hessian eigenvalue: 1/4 X^T X / n + max weight
    L = 0.25 * torch.linalg.eigvalsh(X[:n].T @ X[:n] / n)[-1] + theta.exp().max()
    to = dict(device=device)
    return LogReg(X[:n].to(**to), y[:n].to(**to), X[n:].to(**to), y[n:].to(**to), theta.to(**to), float(1 / L))


def reference_hypergradient(p):
    """Newton to machine precision, then the implicit-function gradient by a dense solve."""
    w = torch.zeros_like(p.theta)
    lam = p.theta.exp()
    for _ in range(50):
        s = torch.sigmoid(p.X @ w)
        H = p.X.T @ (p.X * (s * (1 - s))[:, None]) / len(p.y) + torch.diag(lam)
        w = w - torch.linalg.solve(H, p.grad_inner(w, p.theta))
        if float(p.grad_inner(w, p.theta).abs().max()) < 1e-14:
            break
    wr = w.clone().requires_grad_()
    (gw,) = torch.autograd.grad(p.outer(wr), wr)
    return -(lam * w) * torch.linalg.solve(H, gw)


def hypergradient(p, method, K):
    """Forward (K inner steps) + backward; returns d outer / d theta."""
    theta = p.theta.clone().requires_grad_()
    w0 = torch.zeros_like(theta)
    if method == "torchopt":
        import torchopt

        @torchopt.diff.implicit.custom_root(p.grad_inner, argnums=1,
                                            solve=torchopt.linear_solve.solve_cg(rtol=1e-10, maxiter=1000))
        def solver(w, theta):
            with torch.no_grad():
                for _ in range(K):
                    w = p.step(w, theta)
            return w
        w = solver(w0, theta)
    else:
        w = bilevel.iterate(p.step, w0, theta, K, backward=method, optimality=p.grad_inner,
                            solve="cg", tol=1e-10, maxiter=1000)
    (g,) = torch.autograd.grad(p.outer(w), theta)
    return g


def measure_memory(method, K, device="cpu"):
    """Peak memory (MiB) of one forward + backward and its relative error, in this process, after a
    one-step warm-up run (lazy imports and initialisation, without filling malloc's free lists)."""
    p = make_problem(device=device)
    ref = reference_hypergradient(p)
    with warnings.catch_warnings():  # one step is far from converged: expected
        warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
        hypergradient(p, method, 1)
    g, mem = peak_extra_mb(lambda: hypergradient(p, method, K), device)
    return {"mem_mb": mem, "rel_err": float((g - ref).norm() / ref.norm())}


def measure_times(K, methods, repeats, device="cpu"):
    """Median wall time of forward + backward per method, the methods interleaved round-robin so
    that machine noise falls on all of them alike."""
    p = make_problem(device=device)
    for m in methods:  # warm-up: lazy imports and first-call initialisation are not timed
        hypergradient(p, m, 1)
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            t0 = time.perf_counter()
            hypergradient(p, m, K)
            if device != "cpu":
                torch.cuda.synchronize()
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}


def run(Ks=(100, 1000, 3000), methods=METHODS, repeats=3, device="cpu"):
    """Rows {method, K, time_s, mem_mb, rel_err}: memory and error from a fresh process per row,
    times from this process."""
    rows = []
    for K in Ks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
            times = measure_times(K, methods, repeats, device)
        for m in methods:
            cmd = [sys.executable, "-W", "ignore", "-m", "problems.engine_bench", m, str(K), device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append({"method": m, "K": K, "time_s": times[m], **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def summary(rows):
    """Ratios the issue asks for: speed-up of implicit over unrolled and over torchopt, per K."""
    by = {(r["method"], r["K"]): r for r in rows}
    out = []
    for K in sorted({r["K"] for r in rows}):
        imp = by.get(("implicit", K))
        if imp is None:
            continue
        for peer in ("unrolled", "torchopt"):
            if (peer, K) in by:
                out.append({"K": K, "vs": peer, "speedup": by[(peer, K)]["time_s"] / imp["time_s"],
                            "mem_ratio": by[(peer, K)]["mem_mb"] / max(imp["mem_mb"], 1e-3)})
    return out


def _bench(args):
    rows = run(Ks=args.K, repeats=args.repeats, device=args.device)
    table(summary(rows))
    emit({"rows": rows}, args.json, rows=rows, columns=["method", "K", "time_s", "mem_mb", "rel_err"])


def add_bench(sub):
    p = sub.add_parser("implicit", help="implicit vs unrolled vs torchopt on logistic-regression hyper-gradients")
    p.add_argument("--K", type=int, nargs="+", default=[100, 1000, 3000], help="inner gradient steps")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)


if __name__ == "__main__":  # worker: the memory of one row in a fresh process
    print(json.dumps(measure_memory(sys.argv[1], int(sys.argv[2]), sys.argv[3])))


def reproduce(quick, outdir):
    """Registered experiment 'engine': the benchmark's headline ratios (no published numbers)."""
    Ks = (100, 1000) if quick else (100, 1000, 3000)
    rows = run(Ks=Ks, repeats=3)
    (outdir / "bench_implicit.json").write_text(json.dumps({"rows": rows}, indent=2))
    by = {(r["method"], r["K"]): r for r in rows}
    out = []
    for K in Ks:
        imp = by[("implicit", K)]
        setting = f"logreg n=2000 d=300 K={K}"
        out += [
            {"experiment": "engine", "setting": setting, "metric": "rel_err implicit", "ours": imp["rel_err"],
             "published": None},
            {"experiment": "engine", "setting": setting, "metric": "speedup vs unrolled",
             "ours": by[("unrolled", K)]["time_s"] / imp["time_s"], "published": None},
            {"experiment": "engine", "setting": setting, "metric": "speedup vs torchopt",
             "ours": by[("torchopt", K)]["time_s"] / imp["time_s"], "published": None},
            {"experiment": "engine", "setting": setting, "metric": "mem MB implicit / unrolled",
             "ours": f"{imp['mem_mb']:.2f} / {by[('unrolled', K)]['mem_mb']:.2f}", "published": None},
        ]
    return out


register("engine", reproduce)
