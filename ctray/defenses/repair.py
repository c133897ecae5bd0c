"""Pivotal Tuning (Lukas & Kerschbaum 2023, seed-defenses.md §1.2): the loss of one step.

``L = L_task + lam_slol * L_slol + lam_param * L_param`` on a trusted batch ``(x, y)``, with the frozen
pivot f0 (a copy of the suspect model before tuning):

- ``L_task``: CE(f(x), y) with labels; label-free, soft CE to the pivot's softmax at T = 1.
- ``L_param``: mean over all trainable scalars of ``(theta - theta0)^2``.
- ``L_slol`` (soft latent orthogonality) from the class centroids of the batch's classes, in f's
  penultimate features z and f0's z0: the Frobenius norm of the off-diagonal part of
  ``G = M^T M / k`` (``M``: the ``k x D`` stacked centroids, so G is the ``D x D`` uncentred covariance of
  the centroids, "as written" in the reference, whose docstring calls it the covariance matrix), plus
  ``1/2 sum_{i != j} cos(mu_i - mu_j, mu0_i - mu0_j)`` (added, so minimising rotates centroid
  differences away from the pivot's).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["centroids", "gram_offdiag_norm", "param_loss", "pivot_params", "pt_loss", "slol_loss"]


def centroids(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means of the classes present in the batch.

    Args:
        z: float (B, D) features.
        y: int64 (B,) labels.

    Returns:
        ``(mu (k, D), classes (k,))`` for the k distinct labels in ``y`` (sorted); a class with a single
        sample has that sample as its centroid.
    """
    classes, inv = torch.unique(y, sorted=True, return_inverse=True)
    k = int(classes.shape[0])
    sums = torch.zeros(k, z.shape[1], dtype=z.dtype, device=z.device).index_add(0, inv, z)
    counts = torch.bincount(inv, minlength=k).to(z.dtype).clamp_min(1)
    return sums / counts[:, None], classes


def gram_offdiag_norm(m: torch.Tensor, offdiag: bool = True) -> torch.Tensor:
    """Orthogonality term of the centroids ``m (k, D)``: the Frobenius norm of the off-diagonal part of
    ``G = m^T m / k`` (``D x D``).

    ``offdiag=False`` reproduces the reference code, which subtracts the diagonal *vector* with
    broadcasting (``G - diag(G)[None, :]``) instead of zeroing the diagonal (seed-defenses.md §1.2).
    """
    k = m.shape[0]
    g = m.T @ m / max(k, 1)
    if offdiag:
        g = g - torch.diag_embed(torch.diagonal(g))
    else:
        g = g - torch.diagonal(g)[None, :]
    return torch.linalg.matrix_norm(g)


def slol_loss(z: torch.Tensor, z0: torch.Tensor, y: torch.Tensor, offdiag: bool = True) -> torch.Tensor:
    """Soft latent orthogonality loss of a batch (scalar; 0 when fewer than 2 classes are present).

    Args:
        z: float (B, D) features of the model being tuned (with grad).
        z0: float (B, D) features of the frozen pivot (no grad).
        y: int64 (B,) labels.
        offdiag: the intended off-diagonal norm (True) or the reference's broadcast (False).
    """
    mu, _ = centroids(z, y)
    if mu.shape[0] < 2:
        return z.sum() * 0.0
    mu0, _ = centroids(z0.detach(), y)
    orth = gram_offdiag_norm(mu, offdiag)
    d = mu[:, None, :] - mu[None, :, :]  # (k, k, D)
    d0 = mu0[:, None, :] - mu0[None, :, :]
    cos = F.cosine_similarity(d, d0, dim=-1, eps=1e-8)  # (k, k); the diagonal pairs are 0/0 -> 0
    off = ~torch.eye(mu.shape[0], dtype=torch.bool, device=z.device)
    return orth + 0.5 * cos[off].sum()


def pivot_params(model: nn.Module) -> list[torch.Tensor]:
    """Detached copies of all of ``model``'s parameters, in ``parameters()`` order (theta0)."""
    return [p.detach().clone() for p in model.parameters()]


def param_loss(model: nn.Module, theta0: list[torch.Tensor]) -> torch.Tensor:
    """``mean over all scalars of (theta - theta0)^2`` (squared L2 distance / parameter count)."""
    params = list(model.parameters())
    if len(params) != len(theta0):
        raise ValueError(f"pivot has {len(theta0)} parameter tensors, the model {len(params)}")
    # sum() is typed Tensor | int (its start 0); with >= 1 parameter (checked above) it is a Tensor
    total = cast(torch.Tensor, sum(((p - p0) ** 2).sum() for p, p0 in zip(params, theta0, strict=True)))
    n = sum(p.numel() for p in params)
    return total / n


def pt_loss(logits: torch.Tensor, z: torch.Tensor, logits0: torch.Tensor, z0: torch.Tensor, y: torch.Tensor,
            model: nn.Module, theta0: list[torch.Tensor], lam_slol: float, lam_param: float, use_labels: bool,
            offdiag: bool = True, y_feat: torch.Tensor | None = None, kd: float = 0.0, kd_t: float = 4.0
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """The Pivotal Tuning loss of one batch and its parts (for logging).

    Args:
        logits, z: f's logits (B, K) and features (B, D) (with grad).
        logits0, z0: the pivot's (no grad).
        y: int64 (B,) trusted labels (used by L_task only when ``use_labels``, and by SLOL's centroids).
        model: f (unwrapped), for L_param; theta0: :func:`pivot_params` of the pivot.
        y_feat: class of each row of ``z`` / ``z0`` for SLOL when those rows differ from the batch's (rows
            all-gathered from every worker, or the pivot's predictions in the label-free variant); default ``y``.
        kd, kd_t: ctray's extension (0 = the paper's PT): with labels, add ``kd * kd_t**2 *
            KL(softmax(logits0 / kd_t) || softmax(logits / kd_t))``, Hinton distillation from the pivot on
            the same clean batch, so the tuning keeps the pivot's answers on clean images, not only the
            labels (the ``kd`` part, in nats). Without labels the task is already the pivot's softmax.
    """
    parts: dict[str, float] = {}
    if use_labels:
        task = F.cross_entropy(logits, y)
        if kd > 0:
            kl = F.kl_div((logits / kd_t).log_softmax(1), (logits0.detach() / kd_t).log_softmax(1),
                          reduction="batchmean", log_target=True)
            task = task + kd * kd_t ** 2 * kl
            parts["kd"] = float(kl.detach())
    else:
        task = -(logits0.detach().softmax(1) * logits.log_softmax(1)).sum(1).mean()
    sl = slol_loss(z, z0, y if y_feat is None else y_feat, offdiag) if lam_slol else logits.sum() * 0.0
    pl = param_loss(model, theta0) if lam_param else logits.sum() * 0.0
    loss = task + lam_slol * sl + lam_param * pl
    return loss, {"task": float(task.detach()), "slol": float(sl.detach()), "param": float(pl.detach()), **parts}
