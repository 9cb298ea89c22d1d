"""Proximal bundle steps on the exact worst-case distortion (problems.wc_polish) and the chart model."""
import math
import warnings

import numpy as np
import pytest
import torch

import bilevel
from problems.distortion import distortion
from problems.embeddings import ChartEmbedding, ConstantCurvature, DeepEmbedding, fit, to_conformal_chart
from problems.graph_embedding_cli import embed
from problems.graphs import all_pairs, from_edges, load_graph, shortest_paths
from problems.wc_polish import _gradients, polish_wc

TRIANGLE = from_edges([(0, 1), (1, 2), (0, 2)], "triangle")


def _d_wc(model, pairs, dg):
    with torch.no_grad():
        return distortion(model(torch.as_tensor(pairs)).numpy(), dg)["d_wc"]


def test_polish_reaches_the_closed_form_optimum_of_a_triangle_in_R1():
    """Three nodes at graph distance 1 on a line a < b < c: D_wc = (c - a) / min(b - a, c - b) >= 2, equality
    at b = (a + c) / 2 only, a kink of the max that gradient steps on the smooth loss only approach."""
    pairs, dg = all_pairs(TRIANGLE)
    model = ChartEmbedding("euclidean", torch.tensor([[0.0], [0.3], [1.7]], dtype=torch.float64), 1.0)
    start = _d_wc(model, pairs, dg)
    history = []
    end = polish_wc(model, pairs, dg, steps=60, history=history)
    assert start == pytest.approx(1.7 / 0.3) and end == pytest.approx(2.0, abs=1e-6)
    assert end == pytest.approx(_d_wc(model, pairs, dg), rel=1e-12)  # the model is at the returned value
    kept = [h["d_wc"] for h in history if h["accepted"]]
    assert all(b <= a for a, b in zip(kept, kept[1:]))


def test_polish_undistorts_a_path_in_R1_from_a_bad_start():
    g = from_edges([(0, 1), (1, 2), (2, 3), (3, 4)], "path5")
    pairs, dg = all_pairs(g)
    model = ChartEmbedding("euclidean", torch.tensor([[0.0], [1.6], [1.9], [3.5], [3.6]], dtype=torch.float64), 1.0)
    assert polish_wc(model, pairs, dg, steps=200) == pytest.approx(1.0, abs=1e-6)


def test_polish_lowers_a_hyperbolic_fit_and_never_keeps_a_worse_iterate():
    g = load_graph("tree6")
    pairs, dg = all_pairs(g)
    fitted = ConstantCurvature(g.n, [("lorentz", 2)], shortest_paths(g), seed=0)
    fit(fitted, pairs, dg, steps=200, loss="wc")
    chart = ChartEmbedding(*to_conformal_chart(fitted))
    start = _d_wc(chart, pairs, dg)
    assert start == pytest.approx(_d_wc(fitted, pairs, dg), rel=1e-9)  # the chart keeps every distance
    history = []
    end = polish_wc(chart, pairs, dg, steps=40, history=history)
    assert end < start - 1e-3 and end == pytest.approx(_d_wc(chart, pairs, dg), rel=1e-12)
    assert all(h["actual"] > 0 for h in history if h["accepted"])


@pytest.mark.parametrize("conformal", ["poincare", "sphere"])
def test_chart_distance_gradient_float64(conformal):
    g = load_graph("tree6")
    pairs = torch.as_tensor(all_pairs(g)[0])
    z = 0.4 * torch.randn(g.n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = ChartEmbedding(conformal, torch.zeros(g.n, 3, dtype=torch.float64), 1.3)

    def dist(zz):
        return torch.func.functional_call(model, {"z": zz}, (pairs,))
    assert torch.autograd.gradcheck(dist, (z.requires_grad_(),))


def test_jacobian_rows_batched_and_per_pair_agree_with_one_backward():
    """_gradients: the vectorised rows (chart model) and the per-pair rows (Deep's implicit log map) both
    give w^T J = grad (w^T log r) for random weights w."""
    g = load_graph("tree6")
    pairs, dg = all_pairs(g)
    pairs, log_dg = torch.as_tensor(pairs)[:5], torch.log(torch.as_tensor(dg))[:5]
    w = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = torch.as_tensor(ConstantCurvature(g.n, [("euclidean", 2)], shortest_paths(g), seed=0).points[0].detach())
    deep = DeepEmbedding(g.n, 2, init=x, hidden=4, steps=8)
    with torch.no_grad():
        for p in deep.metric.parameters():
            p.add_(0.05 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(2)))
    for model in (ChartEmbedding("euclidean", x, 1.0), deep):
        params = [p for p in model.parameters() if p.requires_grad]
        J = _gradients(model, params, pairs, log_dg)
        ref = torch.autograd.grad((w * (torch.log(model(pairs)) - log_dg)).sum(), params)
        assert torch.allclose(w @ J, torch.cat([r.reshape(-1) for r in ref]), rtol=1e-7, atol=1e-10)


def test_polish_stops_where_a_distance_has_no_gradient():
    """Antipodal nodes on the sphere (the cut locus): the distance has no gradient; the polish says so and
    stops at its best iterate."""
    g = from_edges([(0, 1), (1, 2)], "path3")
    pairs, dg = all_pairs(g)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # chart points of z below
    model = ChartEmbedding("sphere", x, 1.0)
    with torch.no_grad():
        model.z.copy_(torch.tensor([[-math.pi / 2, 0.0], [0.0, 0.0], [math.pi / 2, 0.0]]))
    with pytest.warns(RuntimeWarning, match="no finite gradient"):
        end = polish_wc(model, pairs, dg, steps=5)
    assert end == pytest.approx(1.0) and end == pytest.approx(_d_wc(model, pairs, dg), rel=1e-12)


def test_polish_rejects_a_bad_scale_stops_quietly_at_the_optimum_and_warns_when_stuck():
    pairs, dg = all_pairs(TRIANGLE)
    model = ChartEmbedding("euclidean", torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        polish_wc(model, pairs, dg, scale=torch.ones(2))
    history = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert polish_wc(model, pairs, dg, steps=5, history=history) == pytest.approx(2.0)  # already optimal
    assert history == []
    model = ChartEmbedding("euclidean", torch.tensor([[0.0], [0.5], [2.0]], dtype=torch.float64), 1.0)
    with pytest.warns(bilevel.ConvergenceWarning, match="no step lowered D_wc"):
        polish_wc(model, pairs, dg, steps=5, min_rho=1e-2)  # the first trial step (rho 1e-3) is below it


def test_wc_fits_end_polished_in_their_chart():
    g = load_graph("tree6")
    opts = dict(steps=200, wc_steps=100, loss="wc")
    plain, _ = embed(g, "lorentz", 2, polish_steps=0, **opts)
    polished, model = embed(g, "lorentz", 2, polish_steps=30, **opts)
    assert isinstance(model, ChartEmbedding) and model.conformal == "poincare"
    assert polished["d_wc"] < plain["d_wc"]
    flat, model = embed(g, "euclidean", 2, polish_steps=30, **opts)
    deep, _ = embed(g, "deep", 2, init="euclidean", deep_steps=1, hidden=4, log_steps=4,
                    fitted={"euclidean": (model, flat)}, **opts)
    assert deep["init_d_wc"] == flat["d_wc"] and deep["d_wc_start"] == pytest.approx(flat["d_wc"], rel=1e-9)


def test_fit_scale_minimises_the_average_distortion_and_keeps_d_wc():
    g = load_graph("tree6")
    pairs, dg = all_pairs(g)
    z = torch.randn(g.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = ChartEmbedding("poincare", torch.zeros(g.n, 2, dtype=torch.float64), 7.0)
    with torch.no_grad():
        model.z.copy_(z)
        d = model(torch.as_tensor(pairs)).numpy()
    before = distortion(d, dg)
    model.fit_scale(pairs, dg)
    with torch.no_grad():
        after = distortion(model(torch.as_tensor(pairs)).numpy(), dg)
    assert after["d_wc"] == pytest.approx(before["d_wc"], rel=1e-12)
    grid = [distortion(c * d, dg)["d_avg"] for c in np.linspace(0.01, 3, 3000)]
    assert after["d_avg"] <= min(grid) + 1e-12 and after["d_avg"] < before["d_avg"]
