"""A small file to audit with ``python -m normfuse explain`` (used by tests/test_explain.py)."""

import torch


def per_sample_clip(x, max_norm=1.0):
    norms = torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(x.shape[0])])
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    safe = torch.stack([torch.sqrt((x[i] ** 2).sum() + 1e-12) for i in range(x.shape[0])])
    return x * factors[:, None], safe


class Normalise(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 10))

    def forward(self, z):
        rows = torch.stack([e / e.norm() for e in z])
        return rows @ (self.weight / torch.stack([w.norm() for w in self.weight])[:, None]).T
