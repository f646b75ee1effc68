"""Old-feature class statistics and the old head shared by the prototype-based baselines (BCT, UniBCT, AdvBCT, LCE).

Not a compatibility method itself: nothing here is registered. All statistics are computed once, in
`prepare()`, from the old model's features of the *new* training set (method.md, "Baselines").

BCT's influence head (Shen et al., "Towards Backward-Compatible Representation Learning", CVPR 2020,
arXiv:2003.11942) is `influence_prototypes`: the old model's own classifier row for every class the old model was
trained on, and BCT's "synthesised classifier" (the normalised class mean of the old features) for the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_centres(old: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """L2-normalised class means [C, d] of the row-L2-normalised old features `old` [N, d].

    Rows are normalised before averaging (retrieval compares directions; an old feature's norm carries no
    identity), then each mean is normalised. A class with no sample keeps a zero row.
    """
    unit = F.normalize(old.float(), dim=1)  # [N, d]
    sums = torch.zeros(num_classes, unit.shape[1]).index_add_(0, labels.long(), unit)  # [C, d]
    counts = torch.bincount(labels.long(), minlength=num_classes).clamp_min(1).to(sums.dtype)  # [C]
    return F.normalize(sums / counts[:, None], dim=1)


def check_old_classifier(
    rows: torch.Tensor, known: torch.Tensor, num_classes: int, embedding_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated old head: (rows [C, d] float, L2-normalised where known, zero elsewhere; known [C] bool).

    `rows[k]` is the old model's classifier row of new-training-set class k (bias, if any, dropped); only rows
    with `known[k]` are read, so the others may hold anything finite (zeros, typically).
    """
    if rows.shape != (num_classes, embedding_dim):
        raise ValueError(f"old classifier rows must be [{num_classes}, {embedding_dim}], got {list(rows.shape)}")
    if known.shape != (num_classes,) or known.dtype != torch.bool:
        raise ValueError(f"old classifier `known` must be a bool tensor [{num_classes}], got {known.dtype} "
                         f"{list(known.shape)}")  # fmt: skip
    rows = rows.detach().float().cpu()
    known = known.detach().cpu()
    if not bool(torch.isfinite(rows[known]).all()):
        raise ValueError("old classifier rows of known classes must be finite")
    zero = known & (torch.linalg.vector_norm(rows, dim=1) == 0)
    if bool(zero.any()):
        raise ValueError(f"old classifier rows of known classes are zero: {zero.nonzero().flatten()[:10].tolist()}")
    return torch.where(known[:, None], F.normalize(rows, dim=1), torch.zeros_like(rows)), known.clone()


def influence_prototypes(
    old: torch.Tensor,  # [N, d] old features of the new training set
    labels: torch.Tensor,  # [N]
    num_classes: int,
    old_rows: torch.Tensor | None = None,  # [C, d] normalised old-head rows (zero where unknown)
    known: torch.Tensor | None = None,  # [C] bool: classes the old model was trained on
) -> torch.Tensor:
    """BCT's frozen head P [C, d], unit rows: the old head's row where `known`, the synthesised class mean elsewhere.

    Without an old head every class is synthesised (the open-class scenario, where no new class was seen by the
    old model, is exactly this case).
    """
    protos = class_centres(old, labels, num_classes)  # [C, d]
    if old_rows is None or known is None:
        return protos
    return torch.where(known[:, None], old_rows, protos)


def iqr_inliers(values: torch.Tensor) -> torch.Tensor:
    """Sorted values kept by 1.5·IQR outlier removal, with AdvBCT's quartile convention (authors' code).

    Sorted values r, n = len(r): for n ≥ 4, q1 = r[⌊n/4⌋], q3 = r[⌊3n/4⌋] and only values inside
    [q1 − 1.5·IQR, q3 + 1.5·IQR] are kept; fewer than 4 values are kept as they are.
    """
    r = torch.sort(values.flatten()).values
    n = r.numel()
    if n >= 4:
        q1, q3 = r[n // 4], r[(3 * n) // 4]
        iqr = q3 - q1
        kept = r[(r >= q1 - 1.5 * iqr) & (r <= q3 + 1.5 * iqr)]
        r = kept if kept.numel() else r
    return r


def iqr_max(values: torch.Tensor) -> float:
    """Largest value after 1.5·IQR outlier removal (`iqr_inliers`); 0 for no value."""
    kept = iqr_inliers(values)
    return float(kept.max()) if kept.numel() else 0.0


def iqr_min(values: torch.Tensor) -> float:
    """Smallest value after 1.5·IQR outlier removal (`iqr_inliers`); 0 for no value."""
    kept = iqr_inliers(values)
    return float(kept.min()) if kept.numel() else 0.0


def per_class(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Row indices of each class, in dataset order: list of C tensors [n_c]."""
    order = torch.argsort(labels.long(), stable=True)  # [N]
    counts = torch.bincount(labels.long(), minlength=num_classes).tolist()
    return list(torch.split(order, counts))
