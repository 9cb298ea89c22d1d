"""Graph embedding: loading, distances, distortion metrics, constant-curvature and Deep models, CLI."""
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import bilevel
from problems import cli, graphs
from problems.distortion import distortion, mean_average_precision
from problems.embeddings import (WC_SHARP_TAU, ChartEmbedding, ConstantCurvature, DeepEmbedding, chart_params, chart_points, fit, parse_manifold,
                                 pull_from_cut_locus, ratio_loss, sharp_wc_loss, smooth_log_wc, sphere_angles,
                                 to_conformal_chart, wc_loss)
from problems.graph_embedding_cli import _deep_start, embed
from problems.graphs import all_pairs, from_edges, load_edgelist, load_graph, sample_pairs, shortest_paths
from solvers.metric import poincare_distance, sphere_distance

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "graphs"


# ---- distortion metrics against hand-computed cases
def test_distortion_hand_computed():
    # ratios d/d_G = 1, 2, 1.5: D_wc = 2 / 1, D_avg = (0 + 1 + 0.5) / 3
    out = distortion([1.0, 2.0, 3.0], [1.0, 1.0, 2.0])
    assert out["d_wc"] == pytest.approx(2.0) and out["d_avg"] == pytest.approx(0.5)
    # a uniform scaling is no distortion in D_wc but is in D_avg
    out = distortion([3.0, 6.0], [1.0, 2.0])
    assert out["d_wc"] == pytest.approx(1.0) and out["d_avg"] == pytest.approx(2.0)
    assert distortion([0.0, 1.0], [1.0, 1.0])["d_wc"] == np.inf


def test_distortion_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        distortion([np.nan, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="> 0"):
        distortion([1.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        distortion([1.0], [1.0, 2.0])


def _path_adjacency(n):
    a = np.zeros((n, n))
    a[np.arange(n - 1), np.arange(1, n)] = a[np.arange(1, n), np.arange(n - 1)] = 1
    return a


def test_map_hand_computed():
    adj = _path_adjacency(4)  # path 0-1-2-3
    x = np.array([0.0, 1.0, 2.0, 3.0])
    assert mean_average_precision(abs(x[:, None] - x[None]), adj) == pytest.approx(1.0)
    # nodes 2 and 3 swapped on the line: AP = 1, (1/2 + 2/3)/2, 1, 1/2 -> mAP = 37/48
    x = np.array([0.0, 1.0, 3.0, 2.0])
    assert mean_average_precision(abs(x[:, None] - x[None]), adj) == pytest.approx(37 / 48)


# ---- loading
def test_builtin_graphs_have_documented_sizes():
    sizes = {"tree6": (7, 6), "tree40": (40, 39), "sphere100": (96, 211), "cycle10": (10, 10),
             "cube1": (64, 144), "cube2": (98, 192)}
    for name, (n, e) in sizes.items():
        g = load_graph(name)
        assert (g.n, len(g.edges)) == (n, e), name
        assert np.isfinite(shortest_paths(g)).all(), name
    assert load_graph("cube1").substitute and load_graph("cube2").substitute
    assert not load_graph("tree40").substitute


def test_self_loops_and_duplicates_dropped_and_labels_compacted():
    g = from_edges([(10, 20), (20, 10), (20, 20), (20, 30), (10, 20)], "g")
    assert g.n == 3 and g.edges.tolist() == [[0, 1], [1, 2]]


def test_disconnected_graph_is_a_clear_error_unless_largest_component(tmp_path):
    path = tmp_path / "two.edges.gz"
    with gzip.open(path, "wt") as f:
        f.write("0 1 {}\n1 2 {}\n5 6 {}\n# a comment\n")
    with pytest.raises(ValueError, match="disconnected: 2 components of sizes \\[3, 2\\]"):
        load_edgelist(path)
    g = load_graph(str(path), largest_component=True)
    assert g.n == 3 and len(g.edges) == 2 and "largest component" in g.note


def test_loading_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown graph 'nope'.*tree40"):
        load_graph("nope")
    with pytest.raises(FileNotFoundError, match="no edge-list file"):
        load_edgelist(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 {bad\n")
    with pytest.raises(ValueError, match="not a networkx edge list"):
        load_edgelist(bad)
    bad.write_text("0\n")
    with pytest.raises(ValueError, match="0 node.*no `u v` lines"):
        load_edgelist(bad)
    monkeypatch.setattr(graphs, "graph_data_dirs", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError,
                       match="bio-yeast.edges.gz.*dalab/matrix-manifolds.*BILEVEL_GRAPH_DATA"):
        load_graph("protein")


def test_real_graph_read_from_env_folder(tmp_path, monkeypatch):
    with gzip.open(tmp_path / "fb-messages.edges.gz", "wt") as f:
        f.write("1 2 {}\n2 3 {}\n")
    monkeypatch.setenv("BILEVEL_GRAPH_DATA", str(tmp_path))
    g = load_graph("social")
    assert g.n == 3 and g.substitute and "Social" in g.note


def test_sampled_pairs_match_all_pairs_distances():
    g = load_graph("cube2")
    full = shortest_paths(g)
    p, d = sample_pairs(g, 500, np.random.default_rng(0), n_sources=7)
    assert p.shape == (500, 2) and (p[:, 0] != p[:, 1]).all()
    np.testing.assert_array_equal(d, full[p[:, 0], p[:, 1]])


@pytest.mark.skipif(not DATA.is_dir(), reason="reference data ../shared/data absent")
def test_builtins_match_reference_files():
    for name in ("tree6", "tree40", "cycle10"):
        ref = load_edgelist(DATA / f"{name}.edges.gz")
        mine = load_graph(name)
        assert ref.n == mine.n and (ref.edges == mine.edges).all(), name
    ref = load_edgelist(DATA / "regular_sphere100.edges.gz")
    mine = load_graph("sphere100")
    assert (ref.n, len(ref.edges)) == (mine.n, len(mine.edges))
    assert shortest_paths(ref).max() == shortest_paths(mine).max()  # same diameter, 9
    prot = load_graph("protein")
    assert (prot.n, len(prot.edges)) == (1458, 1948) and prot.substitute


# ---- models
def test_parse_manifold():
    assert parse_manifold("poincare", 5) == [("poincare", 5)]
    assert parse_manifold("product:P5xS5") == [("poincare", 5), ("sphere", 5)]
    assert parse_manifold("product:H2,E1", 3) == [("lorentz", 2), ("euclidean", 1)]
    with pytest.raises(ValueError, match="bad product factor"):
        parse_manifold("product:Q3")
    with pytest.raises(ValueError, match="total dimension 4"):
        parse_manifold("product:P2xS2", 5)
    with pytest.raises(ValueError, match="unknown manifold"):
        parse_manifold("torus", 2)


def test_path_graph_embeds_in_R1_without_distortion():
    g = from_edges([(0, 1), (1, 2), (2, 3)], "path4")
    res, _ = embed(g, "euclidean", 1, steps=100)
    assert res["d_wc"] == pytest.approx(1.0, abs=1e-3) and res["map"] == pytest.approx(1.0)


def test_cycle_embeds_on_a_circle_and_hyperbolic_fits_a_tree():
    res, _ = embed(load_graph("cycle10"), "sphere", 2, steps=400)
    assert res["d_wc"] < 1.01  # 10 points evenly on a great circle are exact
    res_h, _ = embed(load_graph("tree6"), "lorentz", 2, steps=600)
    res_e, _ = embed(load_graph("tree6"), "euclidean", 2, steps=600)
    assert res_h["d_wc"] < res_e["d_wc"] and res_h["d_wc"] < 1.63  # the talk's Tree6 dim-2 row


@pytest.mark.parametrize("spec", ["poincare", "lorentz", "sphere", "product:P2xS2xE1"])
def test_constant_curvature_distance_gradients(spec):
    g = load_graph("tree6")
    pairs, _ = all_pairs(g)
    m = ConstantCurvature(g.n, parse_manifold(spec, None if ":" in spec else 2), shortest_paths(g), seed=1)
    theta = {"points": [p.detach() for p in m.points], "scales": [s.detach() for s in m.log_scales]}
    res = bilevel.check_gradient(lambda th: _dist(m, th, pairs).pow(2).sum(), theta, n_directions=12)
    assert res, res.max_rel_err


def _dist(m, theta, pairs):
    """Distances of m with its points / log-scales replaced by theta's (a functional call)."""
    params = {f"points.{k}": p for k, p in enumerate(theta["points"])}
    params.update({f"log_scales.{k}": s for k, s in enumerate(theta["scales"])})
    return torch.func.functional_call(m, params, (torch.as_tensor(pairs),))


def test_fit_lowers_the_ratio_loss_on_sampled_batches():
    g = load_graph("tree40")
    pairs, dg = all_pairs(g)
    m = ConstantCurvature(g.n, [("poincare", 2)], None, seed=0)
    before = ratio_loss(m(torch.as_tensor(pairs)), torch.as_tensor(dg)).item()
    fit(m, pairs, dg, steps=200, lr=0.05, batch=128)
    after = ratio_loss(m(torch.as_tensor(pairs)), torch.as_tensor(dg)).item()
    assert after < 0.5 * before



# ---- the smooth worst-case distortion loss
def test_smooth_log_wc_bounds_the_exact_log_wc_and_tends_to_it():
    g = torch.Generator().manual_seed(0)
    dg = torch.randint(1, 6, (50,), generator=g).double()
    d = dg * torch.exp(0.3 * torch.randn(50, generator=g, dtype=torch.float64))
    exact = math.log(distortion(d.numpy(), dg.numpy())["d_wc"])
    gaps = []
    for tau in (0.3, 0.1, 0.03, 0.01, 0.003, 1e-4):
        s = smooth_log_wc(d, dg, tau).item()
        assert exact <= s + 1e-12 <= exact + 2 * tau * math.log(50) + 1e-12, tau
        gaps.append(s - exact)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3 * gaps[0]
    # scale-free: a uniform scaling of d changes neither D_wc nor the smooth term
    assert smooth_log_wc(3 * d, dg, 0.01).item() == pytest.approx(smooth_log_wc(d, dg, 0.01).item(), abs=1e-12)
    with pytest.raises(ValueError, match="tau > 0"):
        smooth_log_wc(d, dg, 0.0)


def test_wc_loss_gradient_float64():
    g = torch.Generator().manual_seed(1)
    dg = torch.randint(1, 5, (12,), generator=g).double()
    d = (dg * (1 + 0.2 * torch.rand(12, generator=g, dtype=torch.float64))).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: smooth_log_wc(x, dg, 0.05), (d,))
    assert torch.autograd.gradcheck(lambda x: wc_loss(x, dg), (d,))
    assert torch.autograd.gradcheck(lambda x: sharp_wc_loss(x, dg), (d,))


def test_fit_with_the_wc_loss_lowers_d_wc():
    g = load_graph("tree6")
    ratio, _ = embed(g, "lorentz", 2, steps=300)
    wc, _ = embed(g, "lorentz", 2, steps=300, loss="wc", wc_steps=300)
    assert ratio["loss"] == "ratio" and wc["loss"] == "wc"
    # the wc phases start from the same ratio fit; the last (sharp) one keeps its lowest-loss iterate
    assert wc["d_wc"] < ratio["d_wc"] - 0.01 and wc["loss_end"] <= wc["loss_start"]
    # the reported loss is the sharp one: a smooth upper bound on log D_wc within 2 tau log P
    assert math.log(wc["d_wc"]) <= wc["loss_end"] <= math.log(wc["d_wc"]) + 2 * WC_SHARP_TAU * math.log(21) + 1e-12
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        embed(g, "lorentz", 2, steps=10, loss="l1")


class _Scripted(torch.optim.Optimizer):
    """A stub 'optimizer' that sets its one scalar parameter to the next value of a script each step."""

    def __init__(self, params, values):
        super().__init__(params, {"lr": 1.0})
        self.values = iter(values)

    @torch.no_grad()
    def step(self, closure=None):
        self.param_groups[0]["params"][0].fill_(next(self.values))


class _Stretch(torch.nn.Module):
    """d = d_G * (1 + w * c) with a fixed per-pair c in [0.5, 1.5]: the full loss is w^2 mean(c^2)."""

    def __init__(self, dg):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.dg = torch.as_tensor(dg, dtype=torch.float64)
        self.c = torch.linspace(0.5, 1.5, len(dg), dtype=torch.float64)

    def forward(self, pairs, ids=None):
        k = torch.arange(len(self.dg)) if ids is None else ids
        return self.dg[k] * (1 + self.w * self.c[k])


def test_sampled_fit_keeps_the_lowest_full_loss_iterate():
    g = load_graph("tree6")
    pairs, dg = all_pairs(g)
    script = [0.3, 0.1, -0.05, 0.2, 0.4, 0.6]  # the loss falls, then rises to above its start
    c2 = float((torch.linspace(0.5, 1.5, len(dg), dtype=torch.float64) ** 2).mean())
    for every, kept in [(2, 0.1), (1, -0.05), (6, 0.5)]:
        m, checks = _Stretch(dg), []
        fit(m, pairs, dg, steps=6, batch=16, optimizer=_Scripted([m.w], script), eval_every=every, checks=checks)
        assert m.w.item() == pytest.approx(kept)  # never the last iterate (0.6), whose loss is the highest
        ws = [0.5, *script]
        assert [c[0] for c in checks] == sorted({*range(0, 6, every), 6})
        assert [c[1] for c in checks] == pytest.approx([ws[c[0]] ** 2 * c2 for c in checks])
    # the wc loss: the evaluations use it too
    m, checks = _Stretch(dg), []
    fit(m, pairs, dg, steps=6, batch=16, optimizer=_Scripted([m.w], script), eval_every=2, checks=checks, loss="wc")
    assert min(c[1] for c in checks) == pytest.approx(wc_loss(m(pairs), torch.as_tensor(dg)).item())
    # full batch: the lowest per-step loss, as before
    m = _Stretch(dg)
    fit(m, pairs, dg, steps=6, optimizer=_Scripted([m.w], script))
    assert m.w.item() == pytest.approx(-0.05)


def test_wc_batches_carry_the_worst_pairs_of_the_last_evaluation():
    g = load_graph("tree6")
    pairs, dg = all_pairs(g)
    seen = []

    class Recorder(_Stretch):
        def forward(self, pairs, ids=None):
            if ids is not None:
                seen.append(set(ids[:4].tolist()))
            return super().forward(pairs, ids)

    m = Recorder(dg)  # d / d_G = 1 + w c, c increasing with the pair index, w > 0 throughout
    fit(m, pairs, dg, steps=3, batch=8, lr=0.01, loss="wc", hard=4, eval_every=1)
    assert m.w.item() > 0 and seen == [{19, 20, 0, 1}] * 3  # the 2 most stretched and 2 most contracted
    with pytest.raises(ValueError, match="hard pairs"):
        fit(m, pairs, dg, steps=1, batch=8, loss="wc", hard=8)


class _StretchWithFailures(_Stretch):
    """_Stretch whose distances count as non-converged while |w| < 0.08."""

    def forward(self, pairs, ids=None):
        self.last_nonconverged = int(abs(self.w.item()) < 0.08)
        return super().forward(pairs, ids)


def test_fit_never_keeps_an_iterate_with_nonconverged_distances():
    g = load_graph("tree6")
    pairs, dg = all_pairs(g)
    script = [0.3, 0.1, -0.05, 0.2, 0.4, 0.6]  # the lowest loss (-0.05) is an iterate that did not converge
    for batch in (None, 16):
        m = _StretchWithFailures(dg)
        fit(m, pairs, dg, steps=6, batch=batch, optimizer=_Scripted([m.w], script), eval_every=1)
        assert m.w.item() == pytest.approx(0.1)


class _Patterns(torch.nn.Module):
    """d = d_G * R[w] for a scripted state w in {0, 1, 2} (d stays attached to w for backward):
    0 one pair at ratio 1.5 (the rest at 1); 1 twenty pairs at 1.10 and one at 1; 2 one pair at 1.11, one
    at 1 and the rest at 1.05."""

    def __init__(self, dg):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        self.dg = torch.as_tensor(dg, dtype=torch.float64)
        self.R = torch.ones(3, len(dg), dtype=torch.float64)
        self.R[0, 0], self.R[1, :20], self.R[2], self.R[2, 0], self.R[2, 1] = 1.5, 1.10, 1.05, 1.11, 1.0

    def forward(self, pairs, ids=None):
        k = torch.arange(len(self.dg)) if ids is None else ids
        return self.dg[k] * self.R[int(self.w.item())][k] * (1 + 0 * self.w)


def test_wc_fits_keep_the_iterate_with_the_lowest_exact_d_wc():
    """The smooth wc loss prefers one pair at 1.11 to twenty at 1.10 (D_wc 1.11 to 1.10); the kept iterate is
    the lower D_wc."""
    g = load_graph("tree6")
    pairs, dg = all_pairs(g)
    m = _Patterns(dg)
    loss_a, loss_b = (wc_loss(torch.as_tensor(dg) * m.R[k], torch.as_tensor(dg)).item() for k in (1, 2))
    assert loss_b < loss_a
    for batch, kw in ((None, {}), (16, {"eval_every": 1})):
        m = _Patterns(dg)
        fit(m, pairs, dg, steps=3, batch=batch, loss="wc", optimizer=_Scripted([m.w], [1.0, 2.0, 2.0]), **kw)
        assert m.w.item() == 1.0 and distortion(m(pairs).detach().numpy(), dg)["d_wc"] == pytest.approx(1.10)


def test_fit_stops_at_the_best_iterate_when_the_loss_becomes_nan():
    g = load_graph("tree6")
    pairs, dg = all_pairs(g)
    for batch in (None, 16):
        m = _Stretch(dg)
        with pytest.warns(RuntimeWarning, match="loss became nan at step 3"):
            losses = fit(m, pairs, dg, steps=6, batch=batch, eval_every=1,
                         optimizer=_Scripted([m.w], [0.3, 0.1, float("nan"), 0.0, 0.0, 0.0]))
        assert m.w.item() == pytest.approx(0.1) and len(losses) == 3
    m = _Stretch(dg)
    with torch.no_grad():
        m.w.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan at step 0"):
        fit(m, pairs, dg, steps=2)


def test_fit_goes_back_to_the_start_when_no_iterate_converged():
    """A Deep start that converges at evaluation accuracy may fail at training accuracy on every step
    (tree6 dim 5, wc fit: 4 failed log maps and D_wc 2.86 from 1.031 before this rule)."""
    g = load_graph("tree6")
    pairs, dg = all_pairs(g)
    class NeverConverged(_Stretch):
        def forward(self, pairs, ids=None):
            self.last_nonconverged = 1
            return super().forward(pairs, ids)

    for batch in (None, 16):
        m = NeverConverged(dg)
        with pytest.warns(bilevel.ConvergenceWarning, match="back at its start"):
            fit(m, pairs, dg, steps=3, batch=batch, optimizer=_Scripted([m.w], [0.05, 0.0, -0.01]), eval_every=1)
        assert m.w.item() == pytest.approx(0.5)


def test_deep_on_the_sphere_base_stays_off_the_cut_locus():
    """The loss at scale 1.5 wants cycle10's opposite nodes 3.3 rad apart: from 0.989 pi they are projected
    back to at most 0.99 pi after each step (every iterate fit may keep)."""
    g = load_graph("cycle10")
    p, dg = all_pairs(g)
    t = torch.arange(10, dtype=torch.float64) * 2 * math.pi / 10
    z = 0.989 * math.pi / 2 * torch.stack([t.cos(), t.sin()], 1)
    m = DeepEmbedding(g.n, 2, init=chart_points(z, "sphere"), conformal="sphere", scale=1.5, hidden=4, steps=8)
    fit(m, p, dg, steps=4, optimizer=torch.optim.Adam([m.z], lr=0.01))
    assert float(sphere_angles(m.z.detach()).max()) <= 0.99 * math.pi + 1e-9


# ---- Deep (learned metric through the log map)
@pytest.mark.parametrize("conformal", ["euclidean", "poincare", "sphere"])
def test_deep_distance_gradient_matches_finite_differences(conformal):
    torch.manual_seed(0)
    scale = 1.0 if conformal == "euclidean" else 0.5
    m = DeepEmbedding(3, 2, init=scale * torch.tensor([[0.0, 0.0], [1.0, 0.2], [-0.3, 0.8]]), hidden=8,
                      steps=4, tol=1e-11, conformal=conformal, scale=1.3)
    with torch.no_grad():
        m.metric.out.weight.normal_(0, 0.2)
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    x0 = m.z.detach().clone()

    def outer(x):
        return torch.func.functional_call(m, {"z": x}, (pairs,)).pow(2).sum()

    res = bilevel.check_gradient(outer, x0, eps=1e-6, rtol=1e-4, n_directions=4)
    assert res, res.max_rel_err


def test_charts_round_trip_and_keep_distances():
    """Lorentz -> Poincare ball and sphere -> stereographic chart keep every distance; node parameters
    z map to chart points at unit-curvature distance |z| from the origin."""
    g = load_graph("tree6")
    pairs = torch.as_tensor(all_pairs(g)[0])
    i, j = pairs.T
    for kind, exact in (("lorentz", poincare_distance), ("poincare", poincare_distance), ("sphere", sphere_distance)):
        model = ConstantCurvature(g.n, [(kind, 3)], shortest_paths(g), seed=1)
        with torch.no_grad():
            model.log_scales[0].fill_(math.log(0.7))
            ref = model(pairs)
        conformal, x, scale = to_conformal_chart(model)
        assert scale == pytest.approx(0.7) and conformal == ("sphere" if kind == "sphere" else "poincare")
        assert torch.allclose(scale * exact(x[i], x[j]), ref, rtol=1e-6, atol=1e-9), kind
        z = chart_params(x, conformal)
        assert torch.allclose(chart_points(z, conformal), x, atol=1e-12)
        assert torch.allclose(exact(torch.zeros_like(x), x), z.norm(dim=1), atol=1e-9)


def test_deep_from_a_hyperbolic_fit_starts_at_its_distances():
    """The learned metric starts as the fit's own metric: log-map distances equal the fit's."""
    g = load_graph("tree6")
    p, dg = all_pairs(g)
    model = ConstantCurvature(g.n, [("lorentz", 2)], shortest_paths(g), seed=0)
    fit(model, p, dg, steps=300)
    conformal, x, scale = to_conformal_chart(model)
    deep = DeepEmbedding(g.n, 2, init=x, conformal=conformal, scale=scale, hidden=8, steps=32)
    with torch.no_grad():
        ref, d = model(torch.as_tensor(p)), deep(torch.as_tensor(p))
    assert deep.last_nonconverged == 0
    assert float(((d - ref).abs() / ref).max()) <= 1e-4


def test_sphere_angles_closed_form():
    a, b = 1.0, 2.5
    z = torch.tensor([[0.0, 0.0], [a, 0.0], [-b, 0.0], [0.0, b]], dtype=torch.float64)
    ang = sphere_angles(z)
    assert ang[0, 1].item() == pytest.approx(a) and ang[0, 2].item() == pytest.approx(b)
    assert ang[1, 2].item() == pytest.approx(2 * math.pi - a - b)  # the short way round, past the far pole
    assert ang[1, 3].item() == pytest.approx(math.acos(math.cos(a) * math.cos(b)))  # spherical Pythagoras
    assert torch.allclose(ang, ang.T) and float(ang.diagonal().abs().max()) < 1e-6


def test_pull_from_cut_locus():
    """Ten nodes on a great circle (cycle10's sphere fit): antipodal pairs are pulled to at most max_angle
    by the smallest listed shrink; nodes already clear are left alone; an impossible case is an error."""
    t = torch.arange(10, dtype=torch.float64) * 2 * math.pi / 10
    z = math.pi / 2 * torch.stack([t.cos(), t.sin(), 0 * t], 1)
    assert sphere_angles(z).max().item() == pytest.approx(math.pi)
    zc, delta = pull_from_cut_locus(z, max_angle=0.99 * math.pi, shrink=(0.005, 0.02, 0.1))
    assert delta == 0.02 and torch.allclose(zc, 0.98 * z)
    assert sphere_angles(zc).max().item() <= 0.99 * math.pi
    same, zero = pull_from_cut_locus(0.5 * z)
    assert zero == 0.0 and torch.equal(same, 0.5 * z)
    with pytest.raises(ValueError, match="apart after shrinking"):
        pull_from_cut_locus(z, shrink=(0.001,))


def test_deep_from_a_sphere_fit_with_antipodal_nodes():
    """cycle10's sphere fit puts opposite nodes at angle pi (cut locus). Deep starts from it pulled off the
    cut locus: every log map converges and its distances give the closed-form D_wc of the pulled nodes,
    which is far below the Euclidean fit's."""
    g = load_graph("cycle10")
    res, _ = embed(g, "deep", 2, steps=1000, deep_steps=1, init="sphere", hidden=8)
    assert res["init_manifold"] == "sphere" and res["init_d_wc"] < 1.01 and res["init_shrink"] > 0
    assert res["nonconverged_pairs"] == 0
    assert res["d_wc_start"] == pytest.approx(res["init_start_d_wc"], rel=1e-4)
    e, _ = embed(g, "euclidean", 2, steps=1000)
    assert res["d_wc"] < 1.1 < e["d_wc"]


def test_deep_refuses_a_sphere_fit_that_covers_the_sphere():
    """sphere100's dim-2 sphere fit covers S^2: no stereographic chart keeps its nodes near the centre."""
    with pytest.raises(ValueError, match="cover the sphere"):
        embed(load_graph("sphere100"), "deep", 2, steps=300, deep_steps=1, init="sphere")


def test_deep_pulls_a_hyperbolic_fit_in_from_the_boundary():
    """A node 20 unit-curvature lengths from the ball's centre (1 - |x| ~ 4e-9): Deep's start has every node's
    distance from the centre times 15 / 20, at that configuration's D_wc; a fit within 15 is kept as it is."""
    g = load_graph("tree6")
    p, dg = all_pairs(g)
    fitted = ConstantCurvature(g.n, [("poincare", 2)], shortest_paths(g), seed=0)
    z = chart_params(to_conformal_chart(fitted)[1], "poincare")
    z = z * (20.0 / z.norm(dim=1).max())
    far = ChartEmbedding("poincare", chart_points(z, "poincare"), 0.5)
    conformal, x, scale, d_wc, delta = _deep_start(far, {"d_wc": 1.5}, p, dg)
    assert conformal == "poincare" and scale == 0.5 and delta == pytest.approx(0.25)
    assert torch.allclose(chart_params(x, conformal), 0.75 * z, atol=1e-6)
    pulled = ChartEmbedding("poincare", chart_points(0.75 * z, "poincare"), 0.5)
    with torch.no_grad():
        assert d_wc == pytest.approx(distortion(pulled(torch.as_tensor(p)).numpy(), dg)["d_wc"], rel=1e-7)
    near = ChartEmbedding("poincare", chart_points(0.5 * z, "poincare"), 0.5)
    assert _deep_start(near, {"d_wc": 1.5}, p, dg)[3:] == (1.5, 0.0)


def test_deep_init_best_reports_its_start():
    g = load_graph("tree6")
    res, model = embed(g, "deep", 2, steps=300, deep_steps=2, init="best", hidden=8)
    assert res["init_manifold"] in ("euclidean", "poincare", "lorentz", "sphere")
    assert res["d_wc_start"] == pytest.approx(res["init_start_d_wc"], rel=1e-4)
    if res["init_shrink"] == 0:
        assert res["init_start_d_wc"] == res["init_d_wc"]
    assert res["nonconverged_pairs"] == 0 and res["loss_end"] <= res["loss_start"] * (1 + 1e-4)
    with pytest.raises(ValueError, match="unknown Deep init"):
        embed(g, "deep", 2, steps=10, init="hyperbolic")


def test_short_deep_run_on_tree6_lowers_its_loss():
    g = load_graph("tree6")
    res, model = embed(g, "deep", 2, steps=300, deep_steps=6, log_steps=4, eval_log_steps=4,
                       deep_lr=(0.01, 0.01))
    assert res["nonconverged_pairs"] == 0
    # Deep starts at the Euclidean fit (A = I): compare its loss there and after the joint steps
    e, _ = embed(g, "euclidean", 2, steps=300)
    assert res["loss_end"] < e["loss_end"]



def test_deep_with_sampled_batches_ends_at_its_lowest_full_loss():
    g = load_graph("tree6")  # 21 pairs, batches of 8: sampled
    res, _ = embed(g, "deep", 2, steps=200, deep_steps=4, deep_batch=8, deep_eval_every=2, hidden=8,
                   log_steps=4, eval_log_steps=4, deep_lr=(0.05, 0.05))
    steps, losses = zip(*res["full_losses"])
    assert steps == (0, 2, 4) and res["selected_step"] == steps[int(np.argmin(losses))]
    assert min(losses) < losses[-1]  # rates large enough for the loss to rise: the last iterate is not kept
    assert res["loss_end"] == pytest.approx(min(losses), abs=1e-8)  # the kept iterate's loss, same ODE steps
    assert res["loss_start"] == pytest.approx(losses[0], abs=1e-8)


# ---- CLI
def test_embed_cli_json_contract(capsys):
    cli.main(["embed", "--graph", "cycle10", "--dim", "2", "--manifold", "sphere", "--steps", "200",
              "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("graph", "nodes", "dim", "manifold", "d_wc", "d_avg", "map", "seconds",
                "nonconverged_pairs", "substitute"):
        assert key in out
    assert out["graph"] == "cycle10" and out["nodes"] == 10 and out["substitute"] is False
    cli.main(["embed", "--graph", "cycle10", "--manifold", "product:S1xE1", "--steps", "50", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dim"] == 2


def test_picture_example_draws_a_deep_embedding(tmp_path):
    import runpy
    ns = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "graph_embedding_picture.py"))
    g = load_graph("tree6")
    torch.manual_seed(0)
    m = DeepEmbedding(g.n, 2, init=torch.randn(g.n, 2, dtype=torch.float64), hidden=8)
    with torch.no_grad():
        m.metric.out.weight.normal_(0, 0.1)
    out = ns["draw"](m, g, tmp_path / "p.png", n_t=3, grid=4, steps=2)
    assert out.stat().st_size > 10_000
