"""NCCL (Wu et al., "Neighborhood Consensus Contrastive Learning for Backward-Compatible Representation",
AAAI 2022, arXiv:2108.03372), as method.md ("Baselines") and the MixBCT authors' re-implementation
(`compatible_learning_loss.py`) define it.

    L = L_cls(new) + 1 · L_con(features) + 0.01 · L_con(logits)

A queue of K = 8192 L2-normalised OLD features with their labels. For new feature i and queue entry k:
    s_ik = ⟨norm new_i, q_k⟩ / T                 T = 0.05 (method.md; T = 1 on cosines is near uniform)
    w_ik = 0.5 (1 + ⟨norm old_i, q_k⟩)           neighbourhood consensus of the old model
    L_con = −mean_i  Σ_k [y_k = y_i] · w_ik · log softmax_k(s_ik)  /  Σ_k [y_k = y_i]
(the positives' weighted log-probabilities divided by their *count*, as in the authors' code).

Interpretation choices (documented, not in method.md):
- Queue update: the batch's old features (detached) are enqueued *before* the loss, as in the authors' code,
  so each new feature has at least its own old feature as a positive (weight 1); training mode only.
  Enqueuing after the step would leave the first step with an empty queue and most rows without a positive.
- Only filled queue entries take part (the authors' zero-initialised queue also lets empty slots into the
  denominator); a row with no positive (possible only when b > K) is left out of the mean.
- "The same on logits": the same loss on the class-logit vectors of the new model's classifier W,
  z(f) = norm(f) · norm(W)ᵀ ∈ [−1, 1]^C (cosine logits: no ArcFace scale or margin), compared by cosine
  similarity (each z L2-normalised, the same T), with the same positives and weights. Queue entries' logits use
  the *current* W, detached (the authors store stale, scaled logits: a [K, C] queue, 154 MB at C = 4.7k).
  Computed through d × d products, never materialising [K, C]:
  ⟨z_i, z̃_k⟩ = (z_i Ŵ_det) · q_k and ‖z̃_k‖² = q_kᵀ (Ŵ_detᵀ Ŵ_det) q_k.
- The credible-sample selection of the NCCL paper is not applied (the authors' code uses all old features).

The queue (features, labels, pointer, filled count) is made of buffers: it travels in the checkpoint.

Shapes: new [b, d] (grad), old [b, d], labels [b]; queue [K, d], [K].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from components.losses import CompatibilityMethod, MethodArgs, register_method
from components.losses.arcface import ArcFaceHead


class NCCLArgs(MethodArgs):
    queue_size: int = Field(8192, ge=1)  # method.md: a queue of 8192 old features
    temperature: float = Field(0.05, gt=0)  # method.md: τ = 0.05
    feature_weight: float = Field(1.0, ge=0)  # method.md: L_cls + 1 · L_con(features)
    logit_weight: float = Field(0.01, ge=0)  # method.md: + 0.01 · the same on logit vectors


def weighted_supcon(
    sim: torch.Tensor,  # [b, K] similarities / T
    positive: torch.Tensor,  # [b, K] bool, same label
    weight: torch.Tensor,  # [b, K] consensus weights
) -> torch.Tensor:
    """−mean over rows with a positive of Σ_k pos·w·log softmax(sim) / Σ_k pos."""
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)  # [b, K]
    count = positive.sum(dim=1)  # [b]
    per_row = (positive * weight * log_prob).sum(dim=1) / count.clamp_min(1)  # [b]
    has = count > 0
    return -per_row[has].mean() if bool(has.any()) else sim.sum() * 0.0


class NCCL(CompatibilityMethod):
    needs_old_features = True

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        args: NCCLArgs = NCCLArgs(),
    ) -> None:
        super().__init__()
        self.head = ArcFaceHead(embedding_dim, num_classes, s=s, m=m)
        self.temperature = args.temperature
        self.feature_weight, self.logit_weight = args.feature_weight, args.logit_weight
        self.register_buffer("queue_features", torch.zeros(args.queue_size, embedding_dim))  # [K, d] unit rows
        self.register_buffer("queue_labels", torch.full((args.queue_size,), -1, dtype=torch.long))  # [K]
        self.register_buffer("queue_ptr", torch.tensor(0))  # next slot to write
        self.register_buffer("queue_filled", torch.tensor(0))  # valid entries (≤ K)

    @torch.no_grad()
    def enqueue(self, old: torch.Tensor, labels: torch.Tensor) -> None:
        """Write the batch's L2-normalised old features (and labels) at the pointer, wrapping around."""
        size = self.queue_labels.numel()
        old, labels = old[-size:], labels[-size:]  # a batch larger than the queue keeps its last K rows
        slots = (int(self.queue_ptr) + torch.arange(len(labels))) % size
        self.queue_features[slots] = F.normalize(old.float(), dim=1)
        self.queue_labels[slots] = labels.long()
        self.queue_ptr.fill_((int(self.queue_ptr) + len(labels)) % size)
        self.queue_filled.fill_(min(size, int(self.queue_filled) + len(labels)))

    def forward(self, new, labels, old=None, credible=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if old is None:
            raise ValueError("NCCL needs the old features of the batch")
        cls = self.head(new, labels)
        if self.training:  # an eval-mode call (a validation loss) leaves the queue as it is
            self.enqueue(old.detach(), labels)
        filled = int(self.queue_filled)
        queue = self.queue_features[:filled]  # [K', d]
        positive = labels[:, None] == self.queue_labels[:filled][None, :]  # [b, K']
        old_u = F.normalize(old.detach().to(new.dtype), dim=1)  # [b, d]
        weight = 0.5 * (1.0 + old_u @ queue.t())  # [b, K']
        new_u = F.normalize(new, dim=1)  # [b, d]
        feature_term = weighted_supcon(new_u @ queue.t() / self.temperature, positive, weight)

        w = F.normalize(self.head.weight, dim=1)  # [C, d]
        w_det = w.detach()
        z_new = new_u @ w.t()  # [b, C] cosine logits of the new features
        dots = (z_new @ w_det) @ queue.t()  # [b, K'] = ⟨z_new_i, z_queue_k⟩
        queue_norm = ((queue @ (w_det.t() @ w_det)) * queue).sum(dim=1).clamp_min(1e-12).sqrt()  # [K']
        cos = dots / (z_new.norm(dim=1, keepdim=True).clamp_min(1e-12) * queue_norm[None, :])
        logit_term = weighted_supcon(cos / self.temperature, positive, weight)

        loss = cls + self.feature_weight * feature_term + self.logit_weight * logit_term
        return {
            "loss": loss,
            "cls": cls.detach(),
            "contrast": feature_term.detach(),
            "contrast_logits": logit_term.detach(),
        }


@register_method("nccl", args=NCCLArgs)
def build(*, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: NCCLArgs) -> NCCL:
    return NCCL(embedding_dim, num_classes, s=s, m=m, args=args)
