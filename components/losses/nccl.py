"""NCCL (Wu et al., "Neighborhood Consensus Contrastive Learning for Backward-Compatible Representation",
AAAI 2022, arXiv:2108.03372), as method.md ("Baselines") defines it.

    L = L_cls(new) + 1 · L_con(features) + 0.01 · L_con(logits)

A queue of K = 8192 L2-normalised OLD features with their labels. For new feature i and queue entry k:
    s_ik = ⟨norm new_i, q_k⟩ / τ                 τ = 0.05 (method.md; τ = 1 on cosines is near uniform)
    w_ik = 0.5 (1 + ⟨norm old_i, q_k⟩)           neighbourhood consensus of the old model
    L_con = −mean_i  Σ_k [y_k = y_i] · w_ik · log softmax_k(s_ik)  /  Σ_k [y_k = y_i]
(the positives' weighted log-probabilities divided by their *count*, as in the MixBCT authors' code).

"The same on ArcFace-scaled logit vectors": the same loss, same positives, weights and τ, on the class-logit
vectors of the new model's ArcFace head W: z(f, y) = the head's logits of feature f with label y (scale s, margin
m on column y) [C]. New feature i gives z(new_i, y_i) (gradient to the backbone and to W); queue entry k gives
z(q_k, y_k) under the *current* W, detached (the authors' code likewise runs the old features through the new
head, but stores the logits at enqueue time: a [K, C] queue, 154 MB at C = 4.7k). The vectors are compared by
cosine similarity / τ, like the features; the scale s cancels there, the margin does not. Computed through
d × d products, never materialising [K, C]: with ẑ_k = norm(W) q_k, c_k = ẑ_k[y_k], δ_k = margin(c_k) − c_k,
    ⟨z_i, z_k⟩ ∝ (z_i · norm W) · q_k + δ_k z_i[y_k],   ‖z_k‖² ∝ q_kᵀ (norm Wᵀ norm W) q_k + 2 δ_k c_k + δ_k².

Interpretation choices (documented, not in method.md):
- Queue update: the batch's old features (detached) are enqueued *before* the loss, as in the authors' code,
  so each new feature has at least its own old feature as a positive (weight 1); training mode only.
  Enqueuing after the step would leave the first step with an empty queue and most rows without a positive.
- Only filled queue entries take part (the authors' zero-initialised queue also lets empty slots into the
  denominator); a row with no positive (possible only when b > K) is left out of the mean.
- Logit vectors are compared by cosine: the authors' code takes raw dot products of s-scaled logits, which at
  s = 64 and τ = 0.05 would be of order s²·C/(d·τ) and saturate the softmax.
- The credible-sample selection of the NCCL paper is not applied (the authors' code uses all old features).

Variant, registered beside it and labelled: "nccl_authors", the MixBCT authors' re-implementation
(`compatible_learning_loss.py`, arXiv:2308.06948) with its temperature 1, everything else as above.

The queue (features, labels, pointer, filled count) is made of buffers: it travels in the checkpoint.
Reported "contrast" and "contrast_logits" are the unweighted terms.

Shapes: new [b, d] (grad), old [b, d], labels [b]; queue [K, d], [K].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from components.losses import CompatibilityMethod, MethodArgs, register_method, register_variant
from components.losses.arcface import ArcFaceHead


class NCCLAuthorsArgs(MethodArgs):
    """The authors' variant's arguments (its temperature is fixed at 1); NCCL's own add the temperature."""

    queue_size: int = Field(8192, ge=1)  # method.md: a queue of 8192 old features
    feature_weight: float = Field(1.0, ge=0)  # method.md: L_cls + 1 · L_con(features)
    logit_weight: float = Field(0.01, ge=0)  # method.md: + 0.01 · the same on logit vectors


class NCCLArgs(NCCLAuthorsArgs):
    temperature: float = Field(0.05, gt=0)  # method.md: τ = 0.05


def weighted_supcon(
    sim: torch.Tensor,  # [b, K] similarities / τ
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
        args: NCCLAuthorsArgs = NCCLArgs(),
        *,
        authors: bool = False,
    ) -> None:
        super().__init__()
        if not authors and not isinstance(args, NCCLArgs):
            raise TypeError(f"NCCL takes NCCLArgs (with its temperature), got {type(args).__name__}")
        self.head = ArcFaceHead(embedding_dim, num_classes, s=s, m=m)
        self.temperature = 1.0 if authors else args.temperature  # type: ignore[attr-defined]
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

    def logit_cosines(
        self, new: torch.Tensor, labels: torch.Tensor, queue: torch.Tensor, queue_labels: torch.Tensor
    ) -> torch.Tensor:
        """cos(z(new_i, y_i), z(q_k, y_k)) [b, K'] between ArcFace logit vectors, without forming [K', C]."""
        z_new = self.head.logits(new, labels) / self.head.s  # [b, C], margin on y_i; grad to new and W
        w_det = F.normalize(self.head.weight.detach(), dim=1).to(new.dtype)  # [C, d]
        q_cos = (queue * w_det[queue_labels]).sum(dim=1).clamp(-1.0, 1.0)  # [K'] c_k = ẑ_k[y_k]
        delta = self.head.margin(q_cos) - q_cos  # [K'] the margin's change of column y_k
        dots = (z_new @ w_det) @ queue.t() + delta[None, :] * z_new[:, queue_labels]  # [b, K'] ⟨z_i, z_k⟩
        q_sq = ((queue @ (w_det.t() @ w_det)) * queue).sum(dim=1) + 2.0 * delta * q_cos + delta * delta  # [K']
        norms = z_new.norm(dim=1, keepdim=True).clamp_min(1e-12) * q_sq.clamp_min(1e-24).sqrt()[None, :]
        return dots / norms

    def forward(self, new, labels, old=None, credible=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if old is None:
            raise ValueError("NCCL needs the old features of the batch")
        cls = self.head(new, labels)
        if self.training:  # an eval-mode call (a validation loss) leaves the queue as it is
            self.enqueue(old.detach(), labels)
        filled = int(self.queue_filled)
        queue = self.queue_features[:filled].to(new.dtype)  # [K', d]
        queue_labels = self.queue_labels[:filled]  # [K']
        positive = labels[:, None] == queue_labels[None, :]  # [b, K']
        old_u = F.normalize(old.detach().to(new.dtype), dim=1)  # [b, d]
        weight = 0.5 * (1.0 + old_u @ queue.t())  # [b, K']
        new_u = F.normalize(new, dim=1)  # [b, d]
        feature_term = weighted_supcon(new_u @ queue.t() / self.temperature, positive, weight)
        logit_term = weighted_supcon(self.logit_cosines(new, labels, queue, queue_labels) / self.temperature,
                                     positive, weight)  # fmt: skip

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


@register_method("nccl_authors", args=NCCLAuthorsArgs)
def build_authors(
    *, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: NCCLAuthorsArgs
) -> NCCL:
    return NCCL(embedding_dim, num_classes, s=s, m=m, args=args, authors=True)


register_variant("nccl_authors", of="nccl", label="NCCL (MixBCT authors' variant: temperature 1)")
