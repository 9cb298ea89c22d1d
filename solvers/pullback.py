"""Pullback metrics of decoders, usable wherever a metric function is (solvers.metric, geodesic, path_energy).

A decoder maps one latent point z [d] to one data-space tensor [D] or a tuple of them (e.g. the mean and
the standard deviation of a stochastic decoder). Its pullback (expected) metric is

    M(z) = sum_k J_k(z)^T J_k(z) + eps I,        J_k = d decoder_k / d z   [D_k, d]

(Arvanitidis et al. 2018; Beik-Mohammadi et al. 2021 with decoder (mu, sigma)). Jacobians come from
torch.func.jacfwd (or jacrev) vmapped over all points at once; M is differentiable in z (to any order the
decoder allows) and in the decoder's parameters by ordinary autograd.
"""
import torch
from torch import nn


class PullbackMetric(nn.Module):
    """metric(z [..., d]) -> M [..., d, d] = sum_k J_k^T J_k + eps I for decoder(z [d]) -> [D] or tuple.

    mode: "fwd" (jacfwd, d JVPs: best when d is small, the usual latent case) or "rev" (jacrev).
    If decoder is an nn.Module its parameters are this module's parameters.
    """

    def __init__(self, decoder, eps=0.0, mode="fwd"):
        super().__init__()
        if mode not in ("fwd", "rev"):
            raise ValueError(f"mode must be 'fwd' or 'rev', got {mode!r}")
        self.decoder, self.eps, self.mode = decoder, float(eps), mode

    def jacobians(self, z):
        """Tuple of decoder Jacobians, each [..., D_k, d]."""
        d = z.shape[-1]
        jac_fn = torch.func.jacfwd if self.mode == "fwd" else torch.func.jacrev
        jac = torch.func.vmap(jac_fn(self.decoder))(z.reshape(-1, d))
        jacs = jac if isinstance(jac, tuple) else (jac,)
        return tuple(j.reshape(*z.shape[:-1], *j.shape[1:]) for j in jacs)

    def forward(self, z):
        if z.ndim < 1 or not torch.isfinite(z).all():
            raise ValueError(f"pullback metric: latent points must be finite with shape [..., d], got {tuple(z.shape)}")
        M = sum(j.mT @ j for j in self.jacobians(z))
        if self.eps:
            M = M + self.eps * torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
        return M


class ObstacleMetric(nn.Module):
    """Conformally scale a metric near data-space balls: A(z) = (1 + strength * sum_b s_b(z)) M(z).

    embed(z [..., d]) -> x [..., D] places latent points in data space (e.g. the decoder mean);
    centers [n_balls, D], radii [n_balls]. s_b is a smooth step, ~1 inside the ball grown by `margin`
    (relative), ~0 beyond it: s = sigmoid(((1 + margin)^2 r^2 - |x - c|^2) / (width r^2)).
    A geodesic under A pays (1 + strength) times the energy for any stretch inside a ball.
    """

    def __init__(self, metric, embed, centers, radii, strength=1e3, margin=0.25, width=0.1):
        super().__init__()
        centers = torch.as_tensor(centers)
        centers = centers if centers.is_floating_point() else centers.to(torch.get_default_dtype())
        centers = centers.reshape(-1, centers.shape[-1])
        radii = torch.as_tensor(radii, dtype=centers.dtype).reshape(-1)
        if len(radii) != len(centers) or not (radii > 0).all() or not torch.isfinite(centers).all():
            raise ValueError(f"obstacles: need finite centers [n, D] and positive radii [n], "
                             f"got {tuple(centers.shape)}, {radii.tolist()}")
        self.metric, self.embed = metric, embed
        self.register_buffer("centers", centers)
        self.register_buffer("radii", radii)
        self.strength, self.margin, self.width = float(strength), float(margin), float(width)

    def inside(self, z):
        """Smooth obstacle indicator sum_b s_b(z) [...]."""
        x = self.embed(z)
        c, r = self.centers.to(x), self.radii.to(x)
        sq = ((x[..., None, :] - c) ** 2).sum(-1)                           # [..., n_balls]
        return torch.sigmoid(((1 + self.margin) ** 2 * r ** 2 - sq) / (self.width * r ** 2)).sum(-1)

    def forward(self, z):
        return (1 + self.strength * self.inside(z))[..., None, None] * self.metric(z)


def magnification_factor(metric, z):
    """sqrt(det M(z)) [...]: the local volume scaling of the metric (large where the decoder is uncertain)."""
    return torch.linalg.det(metric(z)).clamp_min(0).sqrt()
