"""`bilevel bench geodesic`: batched shooting log map + distance + backward against the closed form,
side by side with stochman's energy-minimising cubic-spline solver on the same pairs."""
import time

import torch

from solvers.geodesic import distance, exp_map, log_map
from solvers.metric import NeuralMetric, poincare, poincare_distance, sphere, sphere_distance

from .report import emit

METRICS = {"poincare": (poincare, poincare_distance, torch.tanh),
           "sphere": (sphere, sphere_distance, torch.tan),
           "neural": (None, None, None)}


def sample_pairs(metric, dim, n, seed, radius=1.5):
    """n pairs at geodesic radius <= radius from the origin, so at distance <= 2 radius (= 3).

    Poincare: |x| = tanh(r/2); sphere: |x| = tan(r/2) (stereographic, away from the cut locus);
    neural: a random NeuralMetric and points in the ball of radius 1."""
    gen = torch.Generator().manual_seed(seed)

    def points(scale):
        u = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        u = u / u.norm(dim=1, keepdim=True)
        r = radius * torch.rand(n, 1, generator=gen, dtype=torch.float64)
        return scale(r / 2) * u

    if metric == "neural":
        return points(lambda r: r / radius * 2), points(lambda r: r / radius * 2)
    scale = METRICS[metric][2]
    return points(scale), points(scale)


def random_neural_metric(dim, seed, scale=0.5):
    torch.manual_seed(seed)
    m = NeuralMetric(dim, hidden=32, init_identity=False).double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


def ours(metric, x, y, steps):
    """log map + distance + backward (gradients in x and y); returns distances and seconds."""
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    t0 = time.perf_counter()
    dist, info = distance(metric, x, y, steps=steps, return_info=True)
    dist.sum().backward()
    return dist.detach(), info, time.perf_counter() - t0


def peer(metric, x, y, n_eval=200):
    """stochman 0.3.0: Manifold.connecting_geodesic (cubic spline, Adam on the curve energy, its
    defaults) and the length of the spline on n_eval points. No backward: its log map has none."""
    from stochman.manifold import Manifold

    class Adapter(Manifold):
        def metric(self, points):
            return metric(points)

    man = Adapter()
    t0 = time.perf_counter()
    curve, _ = man.connecting_geodesic(x, y)
    with torch.no_grad():
        length = man.curve_length(curve(torch.linspace(0, 1, n_eval, dtype=x.dtype)))
    return length.detach(), time.perf_counter() - t0


def run(metric_name, dim, pairs, *, seed=0, steps=32, with_peer=True):
    metric, exact, _ = METRICS[metric_name]
    if metric is None:
        metric = random_neural_metric(dim, seed)
    x, y = sample_pairs(metric_name, dim, pairs, seed)
    ours(metric, x[:2], y[:2], steps)  # warm-up (first-call overheads), both solvers get one
    dist, info, secs = ours(metric, x, y, steps)
    if exact is not None:
        ref = exact(x, y)
        err = (dist - ref).abs() / ref
    else:  # no closed form: the round trip exp_x(log_x(y)) = y, relative to |y - x|
        with torch.no_grad():
            v = log_map(metric, x, y, steps=steps)
            err = (exp_map(metric, x, v, steps=steps) - y).norm(dim=1) / (y - x).norm(dim=1)
        ref = dist
    out = {"metric": metric_name, "dim": dim, "pairs": pairs, "max_rel_err": float(err.max()),
           "median_rel_err": float(err.median()), "converged_frac": float(info.converged.double().mean()),
           "pairs_per_s": pairs / secs, "peer_max_rel_err": None, "peer_pairs_per_s": None}
    if with_peer:
        peer(metric, x[:2], y[:2])
        pdist, psecs = peer(metric, x, y)
        perr = (pdist - ref).abs() / ref  # neural: relative to our distance
        out.update(peer_max_rel_err=float(perr.max()), peer_pairs_per_s=pairs / psecs)
    return out


def _bench(args):
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        out = run(args.metric, args.dim, args.pairs, seed=args.seed, steps=args.steps, with_peer=not args.no_peer)
    finally:
        torch.set_num_threads(threads)
    emit(out, args.json)


def add_bench(bench_sub):
    p = bench_sub.add_parser("geodesic", help="batched log map / distance vs closed forms and stochman")
    p.add_argument("--metric", choices=sorted(METRICS), default="poincare")
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32, help="RK4 steps of the exp map")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (both solvers)")
    p.add_argument("--no-peer", action="store_true", help="skip stochman")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)
