"""The benchmark's workloads: each naive loop, written the way people write it, beside its ideal.

Every workload is a pair of functions with the same signature, ``naive(*inputs)`` and
``ideal(*inputs)``, and a ``make_inputs(B, device)`` that builds their arguments. ``B`` is the loop's
trip count: samples, embeddings, capsules, edges or parameter tensors. ``trains`` marks the
workloads that are also measured forward+backward (gradients w.r.t. the tensors in ``grad_args``).

The naive forms are deliberately not tuned for normfuse: a spelling normfuse does not rewrite
stays as people write it, and the table shows it (graph nodes unchanged).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F

D = 512  # features per sample of the (B, D) workloads
IMAGE = (3, 32, 32)  # (C, H, W) of the image workloads
IMAGE_224 = (3, 224, 224)  # ImageNet-sized inputs: enough bytes per call to measure bandwidth
EMBED = 128  # embedding width of the contrastive loss
CAPSULE_BATCH, CAPSULE_DIM = 16, 8  # CapsNet primary capsules: (batch, B capsules, 8)
LAYER = 64  # width of the MLP whose parameters the DP-SGD and grad-norm workloads use


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    naive_code: str  # the naive loop in one line, for the table
    naive: Callable[..., Any]
    ideal: Callable[..., Any]
    make_inputs: Callable[[int, torch.device], tuple]
    trains: bool  # measured forward+backward too
    grad_args: tuple[int, ...] = ()  # positions of the inputs that need gradients when training
    b_means: str = "samples"


def _randn(*shape: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device)


# --- per-sample L2 norm, (B, D) and (B, C, H, W) --------------------------------------------


def l2_index_naive(x):
    return torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(x.shape[0])])


def l2_iter_naive(x):
    return torch.stack([torch.linalg.norm(row) for row in x])


def l2_unbind_naive(x):
    return torch.stack([r.norm() for r in x.unbind(0)])


def l2_ideal(x):
    return torch.linalg.vector_norm(x, dim=1)


def l2_image_naive(x):
    return torch.stack([x[i].norm() for i in range(len(x))])


def l2_image_ideal(x):
    return torch.linalg.vector_norm(x, dim=(1, 2, 3))


# --- PGD-L2 attack step: per-sample unit-norm gradient, ImageNet-sized -------------------------


def pgd_l2_naive(grad):
    return torch.stack([g / g.norm() for g in grad])


def pgd_l2_ideal(grad):
    # advertorch's normalize_by_pnorm, Madry lab's robustness library: one norm per sample
    return grad / torch.linalg.vector_norm(grad.flatten(1), dim=1).view(-1, 1, 1, 1)


# --- DP-SGD: per-sample clipping over a list of per-sample gradients ------------------------


def _per_sample_grad_shapes() -> list[tuple[int, ...]]:
    """Per-sample gradient shapes of a 3-layer MLP (weights and biases), sample dim left out."""
    return [(LAYER, LAYER), (LAYER,), (LAYER, LAYER), (LAYER,), (10, LAYER), (10,)]


def _clip_and_sum(grads, norms, max_norm):
    clip = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    return [(g * clip.view(-1, *[1] * (g.ndim - 1))).sum(0) for g in grads]


def dpsgd_naive(grads, max_norm=1.0):
    norms = torch.stack([torch.sqrt(sum((g[i] ** 2).sum() for g in grads)) for i in range(len(grads[0]))])
    return _clip_and_sum(grads, norms, max_norm)


def dpsgd_ideal(grads, max_norm=1.0):
    # Opacus' DPOptimizer.clip_and_accumulate
    per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grads]
    norms = torch.stack(per_param, dim=1).norm(2, dim=1)
    return _clip_and_sum(grads, norms, max_norm)


def _dpsgd_inputs(B: int, device: torch.device) -> tuple:
    return ([_randn(B, *s, device=device, seed=k) * 0.05 for k, s in enumerate(_per_sample_grad_shapes())],)


# --- contrastive loss (SimCLR / InfoNCE) that normalises each embedding in a loop ------------


def contrastive_naive(z1, z2, tau=0.1):
    z1 = torch.stack([e / e.norm() for e in z1])
    z2 = torch.stack([e / e.norm() for e in z2])
    logits = z1 @ z2.T / tau
    return F.cross_entropy(logits, torch.arange(len(z1), device=z1.device))


def contrastive_ideal(z1, z2, tau=0.1):
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = z1 @ z2.T / tau
    return F.cross_entropy(logits, torch.arange(len(z1), device=z1.device))


# --- WGAN-GP gradient penalty, per sample ----------------------------------------------------


def wgan_gp_naive(grad):
    """``grad``: d critic / d interpolates, (B, C, H, W), as ``torch.autograd.grad`` returns it."""
    return torch.stack([(g.norm(2) - 1) ** 2 for g in grad]).mean()


def wgan_gp_ideal(grad):
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


# --- capsule-network squash, per capsule -----------------------------------------------------


def squash_naive(s):
    """``s``: (batch, capsules, dim); squash each capsule vector ``s[:, j]``."""
    out = []
    for j in range(s.shape[1]):
        c = s[:, j]
        sq = (c**2).sum(dim=-1, keepdim=True)
        out.append(sq / (1 + sq) * c / torch.sqrt(sq))
    return torch.stack(out, dim=1)


def squash_ideal(s):
    n = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    return n**2 / (1 + n**2) * s / n


# --- point-cloud / mesh edge lengths ---------------------------------------------------------


def edges_naive(p, edges, edge_index):
    return torch.stack([torch.sqrt(((p[a] - p[b]) ** 2).sum()) for a, b in edges])


def edges_ideal(p, edges, edge_index):
    return torch.linalg.vector_norm(p[edge_index[:, 0]] - p[edge_index[:, 1]], dim=1)


def _edges_inputs(B: int, device: torch.device) -> tuple:
    vertices = max(B // 2, 4)
    g = torch.Generator().manual_seed(1)
    index = torch.randint(vertices, (B, 2), generator=g)
    return _randn(vertices, 3, device=device), index.tolist(), index.to(device)


# --- distances from each point to a set (what torch.cdist computes), a row at a time --------


def distances_naive(p, q):
    return torch.stack([(p[i] - q).norm(dim=-1) for i in range(p.shape[0])])


def distances_ideal(p, q):
    return torch.linalg.vector_norm(p[:, None] - q, dim=-1)


# --- a loop-free chain: normalising rows by a hand-written norm ------------------------------


def chain_naive(x):
    return x / torch.sqrt(torch.sum(x**2, -1, keepdim=True))


def chain_ideal(x):
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


# --- global gradient norm over a model's parameters ------------------------------------------


def grad_norm_naive(params):
    return torch.sqrt(sum(p.grad.pow(2).sum() for p in params))


def grad_norm_ideal(params):
    # The fastest batched form under Inductor on CPU (64 tensors, 1 thread: 0.17 ms, against 0.18
    # for a stack of per-tensor vector_norms and 0.28 for torch.nn.utils.get_total_norm, whose
    # torch._foreach_norm Inductor runs as an extern kernel). The naive chain compiles to one
    # fused kernel and is faster still (0.14 ms): here the "ideal" wins on compile time only.
    return torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in params]))


def _grad_norm_inputs(B: int, device: torch.device) -> tuple:
    shapes = _per_sample_grad_shapes()
    params = []
    for k in range(B):
        p = torch.nn.Parameter(_randn(*shapes[k % len(shapes)], device=device, seed=k))
        p.grad = _randn(*p.shape, device=device, seed=10_000 + k) * 0.01
        params.append(p)
    return (params,)


def _tensor(*shape: int, scale: float = 1.0) -> Callable[[int, torch.device], tuple]:
    """``make_inputs`` for one (B, *shape) tensor."""
    return lambda B, dev: (_randn(B, *shape, device=dev) * scale,)


def _trains(name: str, code: str, naive, ideal, make_inputs, grad_args=(0,), **kw) -> Workload:
    return Workload(name, code, naive, ideal, make_inputs, trains=True, grad_args=grad_args, **kw)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        _trains("l2-index", "stack([sqrt((x[i]**2).sum()) for i in range(B)]), x (B, 512)", l2_index_naive, l2_ideal, _tensor(D)),
        _trains("l2-iter", "stack([linalg.norm(row) for row in x]), x (B, 512)", l2_iter_naive, l2_ideal, _tensor(D)),
        _trains("l2-unbind", "stack([r.norm() for r in x.unbind(0)]), x (B, 512)", l2_unbind_naive, l2_ideal, _tensor(D)),
        _trains(
            "l2-image",
            "stack([x[i].norm() for i in range(len(x))]), x (B, 3, 32, 32)",
            l2_image_naive,
            l2_image_ideal,
            _tensor(*IMAGE),
        ),
        Workload(
            "pgd-l2",
            "stack([g / g.norm() for g in grad]), grad (B, 3, 224, 224), under no_grad",
            pgd_l2_naive,
            pgd_l2_ideal,
            _tensor(*IMAGE_224),
            trains=False,
        ),
        Workload(
            "dpsgd-clip",
            "stack([sqrt(sum((g[i]**2).sum() for g in grads)) for i in range(B)]), clamp(C/(n+1e-6), max=1)",
            dpsgd_naive,
            dpsgd_ideal,
            _dpsgd_inputs,
            trains=False,
        ),
        _trains(
            "contrastive",
            "stack([e / e.norm() for e in z]) for both views, then InfoNCE, z (B, 128)",
            contrastive_naive,
            contrastive_ideal,
            lambda B, dev: (_randn(B, EMBED, device=dev), _randn(B, EMBED, device=dev, seed=1)),
            grad_args=(0, 1),
        ),
        _trains(
            "wgan-gp",
            "stack([(g.norm(2) - 1)**2 for g in grad]).mean(), grad (B, 3, 32, 32)",
            wgan_gp_naive,
            wgan_gp_ideal,
            _tensor(*IMAGE, scale=0.1),
        ),
        _trains(
            "capsule-squash",
            "per capsule c = s[:, j]: sq = (c**2).sum(-1, keepdim=True); sq/(1+sq) * c/sqrt(sq), s (16, B, 8)",
            squash_naive,
            squash_ideal,
            lambda B, dev: (_randn(CAPSULE_BATCH, B, CAPSULE_DIM, device=dev),),
            b_means="capsules",
        ),
        _trains(
            "edge-lengths",
            "stack([sqrt(((p[a] - p[b])**2).sum()) for a, b in edges]), p (B/2, 3)",
            edges_naive,
            edges_ideal,
            _edges_inputs,
            b_means="edges",
        ),
        _trains(
            "distances",
            "stack([(p[i] - q).norm(dim=-1) for i in range(B)]), p (B, 16), q (64, 16)",
            distances_naive,
            distances_ideal,
            lambda B, dev: (_randn(B, 16, device=dev), _randn(64, 16, device=dev, seed=1)),
            grad_args=(0, 1),
        ),
        _trains(
            "chain",
            "x / sqrt(sum(x**2, -1, keepdim=True)), no loop, x (B, 512)",
            chain_naive,
            chain_ideal,
            _tensor(D),
        ),
        Workload(
            "grad-norm",
            "sqrt(sum(p.grad.pow(2).sum() for p in params)), MLP-shaped grads",
            grad_norm_naive,
            grad_norm_ideal,
            _grad_norm_inputs,
            trains=False,
            b_means="parameter tensors",
        ),
    ]
}
