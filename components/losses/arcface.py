"""ArcFace classification loss (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
Recognition", CVPR 2019, arXiv:1801.07698), the L_cls every method in method.md shares.

Formulation as in insightface's arcface_torch with easy_margin off: the target logit is cos(θ + m) while
θ + m < π, and cos θ − m·sin(π − m) beyond (keeps the logit monotonic in θ).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ArcFaceHead(nn.Module):
    """Classifier W [n_classes, d] with an additive angular margin on the target class.

    W is initialised N(0, 0.01) as in method.md and is a trainable parameter (weight decay applies).
    """

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim).normal_(0.0, 0.01))
        self.s, self.m = s, m
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.theta = math.cos(math.pi - m)
        self.sinmm = math.sin(math.pi - m) * m

    def margin(self, target: torch.Tensor) -> torch.Tensor:
        """The target-class cosine after the margin, elementwise: cos(θ + m), or cos θ − m·sin(π − m) past π − m."""
        sin = torch.sqrt((1.0 - target * target).clamp_min(1e-12))
        cos_theta_m = target * self.cos_m - sin * self.sin_m
        return torch.where(target > self.theta, cos_theta_m, target - self.sinmm)

    def logits(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits [b, C] with the margin applied to each row's target column."""
        cos = F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1)).clamp(-1.0, 1.0)  # [b, C]
        target = cos.gather(1, labels[:, None])  # [b, 1]
        return cos.scatter(1, labels[:, None], self.margin(target)) * self.s

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(features, labels), labels)


class SoftmaxHead(nn.Module):
    """Plain softmax classifier (linear layer + cross-entropy): the 'weak' old-model recipe of method.md."""

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(features), labels)
