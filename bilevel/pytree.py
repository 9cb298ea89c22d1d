"""Flatten nested dicts/tuples/lists of tensors into one [B, n] matrix and back.

Unbatched trees become [1, n]; batched trees (every leaf with the same leading
dimension B, problem b depending only on slice b) become [B, n].
"""
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["tree_flatten", "tree_unflatten", "Packer"]


@dataclass
class Packer:
    """Maps a list of tensor leaves to a [B, n] matrix and back."""

    shapes: list
    batched: bool

    @classmethod
    def of(cls, leaves, batched=False):
        if batched:
            sizes = {t.shape[0] if t.dim() else None for t in leaves}
            if len(sizes) != 1 or None in sizes:
                raise ValueError(
                    "batched=True needs every leaf of z to share one leading batch dimension; "
                    f"got shapes {[tuple(t.shape) for t in leaves]}")
        return cls([tuple(t.shape) for t in leaves], batched)

    @property
    def batch(self):
        return self.shapes[0][0] if self.batched else 1

    def pack(self, leaves, n_lead=0):
        """list of tensors (each with n_lead extra leading dims) -> [..., B, n]."""
        return torch.cat([t.reshape((*t.shape[:n_lead], self.batch, -1)) for t in leaves], dim=-1)

    def unpack(self, mat):
        """[..., B, n] -> list of tensors with the recorded shapes (and the same leading dims)."""
        out, i, lead = [], 0, mat.shape[:-2]
        for s in self.shapes:
            k = 1
            for d in (s[1:] if self.batched else s):
                k *= d
            out.append(mat[..., i:i + k].reshape((*lead, *s)))
            i += k
        return out
