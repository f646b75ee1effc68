"""Old-feature class statistics shared by the prototype-based baselines (BCT, UniBCT, AdvBCT, LCE).

Not a compatibility method itself: nothing here is registered. All statistics are computed once, in
`prepare()`, from the old model's features of the *new* training set (method.md, "Baselines").
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


def iqr_max(values: torch.Tensor) -> float:
    """Largest value after 1.5·IQR outlier removal, with AdvBCT's quartile convention (authors' code).

    Sorted values r, n = len(r): for n ≥ 4, q1 = r[⌊n/4⌋], q3 = r[⌊3n/4⌋] and only values inside
    [q1 − 1.5·IQR, q3 + 1.5·IQR] are kept; fewer than 4 values are kept as they are.
    """
    r = torch.sort(values.flatten()).values
    n = r.numel()
    if n == 0:
        return 0.0
    if n >= 4:
        q1, q3 = r[n // 4], r[(3 * n) // 4]
        iqr = q3 - q1
        kept = r[(r >= q1 - 1.5 * iqr) & (r <= q3 + 1.5 * iqr)]
        r = kept if kept.numel() else r
    return float(r.max())


def per_class(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Row indices of each class, in dataset order: list of C tensors [n_c]."""
    order = torch.argsort(labels.long(), stable=True)  # [N]
    counts = torch.bincount(labels.long(), minlength=num_classes).tolist()
    return list(torch.split(order, counts))
