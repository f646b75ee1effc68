"""Uncertainty, negative flips and partial backfill for a model upgrade (plain library: numpy, faiss via evaluate).

**Paired bootstrap over test identities.** The unit of sampling is the query identity: queries of one identity
share a face, a lighting, a capture device, so their outcomes are correlated and resampling single queries would
give intervals that are too narrow. Let the queries carry identities 1..I (from yq). A resample draws I identities
with replacement from ``default_rng(seed)``; identity i drawn c_i times brings every one of its queries with
weight c_i, so query q gets weight w_q = c_{id(q)} and the resample is the weight vector w ∈ ℕ^{n_q}. The gallery
is never resampled. The same R weight vectors serve every pair ("paired"), so a difference of two pairs is computed
on the same resampled test set: its interval is narrower than the unpaired one when the pairs are correlated.

For a metric that is a mean of per-query outcomes o_q (top-k hit, AP; ``evaluate.per_query_retrieval``):

    M(w) = Σ_q w_q·o_q / Σ_q w_q                                          (all R resamples at once: W·o / W·1)

For TAR at FAR f over all query×gallery pairs (genuine = same identity), weights apply to pairs through their
query row. With N_imp(w) = Σ_q w_q·n_imp,q and N_gen(w) = Σ_q w_q·n_gen,q, the evaluate module's TAR
(``verification_metrics``: the highest TAR whose FAR <= f on sklearn's ROC) is, exactly,

    k(w) = the largest integer k with k / N_imp(w) <= f                   (compared in float64, as roc_curve does)
    s*(w) = the (k+1)-th highest impostor score, impostors counted with their weights
    TAR(w) = Σ_{genuine pairs p with score_p > s*} w_{q(p)} / N_gen(w)    (NaN when N_imp(w)·f < 1, as in evaluate)

Only the highest impostor scores can be s*, so a pair keeps every genuine score and the top
M = max(TAIL_MIN, ceil(tail_margin · max(fars) · N_imp)) impostor scores with their query rows (tail_margin = 4: the kept tail holds
4·max(fars) of the impostor mass, and a resample would have to lose three quarters of that share before the tail
could not reach its threshold; if one ever does, a ValueError says so rather than returning a wrong number). The
impostor pairs behind N_imp are all of them when n_q·n_g <= evaluate.MAX_PAIRS (20M; the default 4,000 × 2,000 = 8M
pairs are all kept, the tail is 320k scores = 2.5 MB per pair), else the very sample that ``verification_metrics``
draws with the same seed (``evaluate.sample_pairs``: every genuine pair and max_pairs / n_q uniform impostor draws per
query, scored one pair at a time, never the query × gallery matrix). Scores are computed with evaluate's own
normalisation and blocks.

Resolution: none is lost. The full-sample TAR equals ``verification_metrics``' value exactly (same float32 scores,
same threshold rule; the tests assert equality, not closeness), and a resample's TAR equals ``verification_metrics``
on the resampled test set (queries repeated by their weights). Speed comes from the search for s*: the weighted
impostor count above 1,024 checkpoints along the sorted tail is one matrix product for all resamples (W·Cᵀ,
C[b, q] = tail items of query q above checkpoint b), then a cumulative sum over the ≤ M/1024 items between the two
checkpoints that bracket k(w) finds s* exactly.

Intervals are percentile intervals: (point, q_{α/2}, q_{1−α/2}) of the R resampled values, α = 1 − level; the point
is the full-sample value. A difference "a - b" is the interval of M_a(w) − M_b(w) over the same resamples.

**Negative flips** (Yan et al., "Positive-Congruent Training: Towards Regression-Free Model Updates", CVPR 2021,
arXiv:2011.09161): a query that the reference (old/old) gets right at top-1 and the candidate (new/old, new/new) gets
wrong. NFR = #flips / #queries (Yan's rate, over all queries); nf_share = #flips / #reference-correct queries.

**Partial backfill** (FastFill, Jaeckle et al., ICLR 2023, openreview.net/forum?id=rnRiiHw8Vy): new-model queries, the
gallery with a fraction β of its rows re-embedded by the new model in some order, the rest old. M(β) for β on a grid,
AUC = ∫ M dβ / (β_max − β_min) by the trapezoid rule (in [0, 1]); the curve "dips" when M(β) < M(old/old) anywhere.
Orders: "random" (a seeded permutation) and "worst_first": descending confusability, where a gallery row's
confusability is the cosine of its OLD embedding to the nearest OLD gallery row of another identity (rows that the
old model separates worst are re-embedded first; ties keep row order; FastFill orders by an uncertainty that its
training learns, this is the training-free proxy). At β = 0 the curve is new/old, at β = 1
new/new, with evaluate's numbers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from components.evaluate import (
    FARS,
    MAX_PAIRS,
    TOP_KS,
    _blocks,
    _check_inputs,
    _fmt,
    _gallery_counts,
    _json_float,
    _markdown_table,
    sample_pairs,
    per_query_retrieval,
    retrieval_metrics,
    tar_name,
    topk_name,
)

TAIL_MARGIN = 4.0
TAIL_MIN = 200_000  # impostor scores always kept (all of them below that): 1.6 MB
BETAS: tuple[float, ...] = tuple(round(0.1 * i, 10) for i in range(11))
ORDERS: tuple[str, ...] = ("random", "worst_first")
_CHUNK_ELEMENTS = 1 << 22  # resamples × genuine pairs held at once (~32 MB of float64)
_CHECKPOINTS = 1024  # marks along the impostor tail for the matrix-product search (tail_at_far)


# ------------------------------------------------------------------------------------------ verification tail


@dataclass(frozen=True)
class ScoreTail:
    """What TAR@FAR of one pair needs under any reweighting of its queries: every genuine score, the highest
    impostor scores, and the number of (kept) impostor and genuine pairs of each query row."""

    fars: tuple[float, ...]
    impostor: np.ndarray  # [M] float32, the M highest impostor scores, descending
    impostor_query: np.ndarray  # [M] int32, query row of each
    genuine: np.ndarray  # [G] float32, every genuine score, descending
    genuine_query: np.ndarray  # [G] int32
    n_impostor: np.ndarray  # [n_q] int64, impostor pairs per query (the kept sample when subsampled)
    n_genuine: np.ndarray  # [n_q] int64
    complete: bool  # the tail holds every impostor pair: any FAR is resolvable

    @property
    def n_queries(self) -> int:
        return len(self.n_impostor)


def score_tail(
    xq: np.ndarray,
    yq: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    fars: Sequence[float] = FARS,
    max_pairs: int = MAX_PAIRS,
    seed: int = 0,
    tail_margin: float = TAIL_MARGIN,
    tail_min: int = TAIL_MIN,
) -> ScoreTail:
    """Scores of one pair reduced to what `tar_at_far` needs (see the module docstring).

    Pairs, scores and the impostor sample (when n_q·n_g > max_pairs) are those of ``verification_metrics`` with the
    same max_pairs and seed. Memory: one block of scores (~16 MB) plus the tail, 8 bytes per kept score.
    """
    xq, yq, xb, yb = _check_inputs(xq, yq, xb, yb)
    fars = tuple(float(f) for f in fars)
    if not fars or any(not 0 < f for f in fars):
        raise ValueError(f"fars must be positive, got {fars}")
    if tail_margin < 1:
        raise ValueError(f"tail_margin must be >= 1, got {tail_margin}")
    n_q, n_g = len(xq), len(xb)
    n_pairs = n_q * n_g
    n_gen_total = int(_gallery_counts(yq, yb).sum())
    sampled = n_pairs > max_pairs
    # Above max_pairs: the very sample evaluate.verification_metrics draws with the same seed (evaluate.sample_pairs)
    sample = sample_pairs(xq, yq, xb, yb, max_pairs, seed) if sampled else None
    n_imp_total = sample.impostor.size if sample is not None else n_pairs - n_gen_total
    # At least TAIL_MIN scores: with few identities one resample can hold several times the mean impostor mass of
    # the highest-scoring query rows, and keeping a small set whole costs nothing.
    m = min(n_imp_total, max(tail_min, math.ceil(tail_margin * min(max(fars), 1.0) * n_imp_total) + 1))

    if sample is not None:
        genuine, genuine_query = sample.genuine, sample.genuine_query
        impostor, impostor_query = sample.impostor, sample.impostor_query
        n_genuine = np.bincount(genuine_query, minlength=n_q).astype(np.int64)
        n_impostor = np.full(n_q, sample.per_query, dtype=np.int64)
    else:
        n_impostor = np.zeros(n_q, dtype=np.int64)
        n_genuine = np.zeros(n_q, dtype=np.int64)
        gen_s, gen_q, imp_s, imp_q = [], [], [], []
        for blk in _blocks(n_q, n_g):
            s = xq[blk] @ xb.T  # [b, n_g] cosine
            same = yq[blk, None] == yb[None, :]  # [b, n_g]
            rows, _ = np.nonzero(same)
            gen_s.append(s[same])
            gen_q.append(rows + blk.start)
            n_genuine[blk] = same.sum(axis=1)
            imp = ~same
            n_impostor[blk] = imp.sum(axis=1)
            scores = s[imp]
            if scores.size > m:  # the global top m lies within the union of every block's top m
                cut = np.partition(scores, scores.size - m)[scores.size - m]
                imp &= s >= cut
            rows, _ = np.nonzero(imp)
            imp_s.append(s[imp])
            imp_q.append(rows + blk.start)
        genuine, impostor = np.concatenate(gen_s), np.concatenate(imp_s)
        genuine_query, impostor_query = np.concatenate(gen_q), np.concatenate(imp_q)
    if genuine.size == 0:
        raise ValueError("no genuine pair: query and gallery share no identity")
    if impostor.size > m:
        top = np.argpartition(impostor, impostor.size - m)[impostor.size - m :]
        impostor, impostor_query = impostor[top], impostor_query[top]
    complete = impostor.size == int(n_impostor.sum())
    gi, ii = np.argsort(-genuine, kind="stable"), np.argsort(-impostor, kind="stable")
    return ScoreTail(
        fars=fars,
        impostor=impostor[ii],
        impostor_query=impostor_query[ii].astype(np.int32),
        genuine=genuine[gi],
        genuine_query=genuine_query[gi].astype(np.int32),
        n_impostor=n_impostor,
        n_genuine=n_genuine,
        complete=complete,
    )


def _allowed_impostors(n_imp: np.ndarray, far: float) -> np.ndarray:
    """Largest integer k with k / n_imp <= far, compared in float64 like roc_curve's fpr = fps / fps[-1] <= far."""
    n = np.maximum(n_imp.astype(np.float64), 1.0)
    k = np.floor(far * n)
    k = np.where((k + 1) / n <= far, k + 1, k)
    k = np.where(k / n > far, k - 1, k)
    return k.astype(np.int64)


def tar_at_far(tail: ScoreTail, weights: np.ndarray | None = None) -> np.ndarray:
    """TAR at each of tail.fars, exactly as ``verification_metrics`` defines it, for the full sample (weights None:
    shape [n_fars]) or for each row of query weights ([R, n_q] non-negative integers: shape [R, n_fars]).

    NaN where the weighted impostor pairs cannot resolve a FAR (N_imp·FAR < 1). Raises ValueError if the kept tail
    is too short for some resample (rebuild with a larger tail_margin).

    Search for s*: the weighted impostor count at checkpoints every `stride` tail positions is one matrix product
    W·Cᵀ (C[b, q] = tail items of query q above checkpoint b); s* is then found exactly by a cumulative sum over
    the <= stride items between the two checkpoints that bracket k. Counts are integers, exact in float32 below 2^24
    (checked; float64 above)."""
    single = weights is None
    w = np.ones((1, tail.n_queries), dtype=np.int64) if single else np.asarray(weights)
    if w.ndim != 2 or w.shape[1] != tail.n_queries:
        raise ValueError(f"weights must be [R, {tail.n_queries}], got shape {w.shape}")
    if w.size and w.min() < 0:
        raise ValueError("weights must be non-negative")
    n_r, n_q, m = len(w), tail.n_queries, tail.impostor.size
    n_imp = w.astype(np.int64) @ tail.n_impostor  # [R]
    n_gen = w.astype(np.int64) @ tail.n_genuine  # [R]
    w_max = int(w.max(initial=0))
    exact32 = w_max * max(m, tail.genuine.size) < 2**24
    wf = w.astype(np.float32 if exact32 else np.float64)

    # checkpoints p_b = b·stride (b = 0..nb−1) and the tail's end M
    stride = max(1, math.ceil(m / _CHECKPOINTS))
    marks = np.append(np.arange(0, m, stride), m)  # [nb + 1]
    block = np.arange(m) // stride
    counts = np.bincount(block * n_q + tail.impostor_query, minlength=(len(marks) - 1) * n_q)
    cum_counts = np.zeros((len(marks), n_q), dtype=wf.dtype)  # [nb + 1, n_q] tail items above each mark
    np.cumsum(counts.reshape(len(marks) - 1, n_q), axis=0, out=cum_counts[1:])
    cum_at = wf @ cum_counts.T  # [R, nb + 1] weighted impostors above each mark

    pos = np.full((n_r, len(tail.fars)), -1, dtype=np.int64)  # index of s* in the tail; −1: NaN, m: past the tail
    for j, far in enumerate(tail.fars):
        ks = _allowed_impostors(n_imp, far)
        for r in range(n_r):
            if n_imp[r] * far < 1 or n_gen[r] == 0:
                continue  # NaN, as in evaluate
            b = int(np.searchsorted(cum_at[r], ks[r], side="right")) - 1  # last mark with <= k above it
            if b >= len(marks) - 1:
                pos[r, j] = m
                continue
            lo, hi = marks[b], marks[b + 1]
            seg = cum_at[r, b] + np.cumsum(wf[r, tail.impostor_query[lo:hi]])
            pos[r, j] = lo + int(np.searchsorted(seg, ks[r], side="right"))  # the (k+1)-th weighted impostor

    past = pos >= m
    if past.any() and not tail.complete:
        bad = {f: int(n) for f, n in zip(tail.fars, past.sum(axis=0)) if n}
        raise ValueError(
            f"the kept impostor tail ({m} scores) does not reach the threshold at "
            + ", ".join(f"FAR {f:g} in {n} of {n_r} resamples" for f, n in bad.items())
            + "; rebuild the pair scores with a larger tail_margin"
        )
    # genuine pairs strictly above s* (all of them when every impostor is accepted)
    s_star = tail.impostor[np.clip(pos, 0, max(m - 1, 0))] if m else np.zeros(pos.shape, np.float32)
    above = np.searchsorted(-tail.genuine, -s_star, side="left")  # [R, n_fars]
    above = np.where(past, tail.genuine.size, above)
    out = np.full((n_r, len(tail.fars)), np.nan)
    step = max(1, _CHUNK_ELEMENTS // max(tail.genuine.size, 1))
    for start in range(0, n_r, step):
        rows = slice(start, start + step)
        cum_gen = np.zeros((len(wf[rows]), tail.genuine.size + 1), dtype=np.float64)  # [c, G + 1]
        np.cumsum(wf[rows][:, tail.genuine_query], axis=1, dtype=np.float64, out=cum_gen[:, 1:])
        accepted = np.take_along_axis(cum_gen, above[rows], axis=1)  # [c, n_fars]
        out[rows] = accepted / n_gen[rows, None]
    out[pos < 0] = np.nan
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------- pair scores


@dataclass(frozen=True)
class PairScores:
    """Per-query outcomes of one (query model, gallery model) pair and its verification tail.

    ``per_query[metric]`` is the [n_q] quantity whose mean is the metric: ``top{k}`` hits (bool) and, under
    ``mAP``, each query's AP. ``retrieval_queries`` (bool [n_q], or None for all) selects the queries the 1:N
    metrics average over (open-set data); verification always uses every query."""

    per_query: Mapping[str, np.ndarray]
    tail: ScoreTail | None = None
    retrieval_queries: np.ndarray | None = None

    @property
    def n_queries(self) -> int:
        if self.per_query:
            return len(next(iter(self.per_query.values())))
        return 0 if self.tail is None else self.tail.n_queries


def pair_scores(
    xq: np.ndarray,
    yq: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    ks: Sequence[int] = TOP_KS,
    fars: Sequence[float] = FARS,
    map_cutoff: int | None = None,
    retrieval_queries: np.ndarray | None = None,
    max_pairs: int = MAX_PAIRS,
    seed: int = 0,
    tail_margin: float = TAIL_MARGIN,
) -> PairScores:
    """Everything the bootstrap needs of queries xq (one model) against gallery xb (the same or another model);
    arguments as in evaluate.compatibility_table / verification_metrics."""
    yq = np.asarray(yq).ravel()
    n_q = len(yq)
    if retrieval_queries is None:
        per = per_query_retrieval(xq, yq, xb, yb, ks=ks, map_cutoff=map_cutoff)
    else:
        retrieval_queries = np.asarray(retrieval_queries, dtype=bool).ravel()
        if retrieval_queries.shape != (n_q,):
            raise ValueError(f"retrieval_queries has {retrieval_queries.size} entries for {n_q} queries")
        sub = per_query_retrieval(np.asarray(xq)[retrieval_queries], yq[retrieval_queries], xb, yb, ks, map_cutoff)
        per = {}
        for name, v in sub.items():  # full length; the entries of other queries are never read
            per[name] = np.zeros(n_q, dtype=v.dtype)
            per[name][retrieval_queries] = v
    per["mAP"] = per.pop("AP")
    tail = None if not fars else score_tail(xq, yq, xb, yb, fars, max_pairs, seed, tail_margin)
    return PairScores(per_query=per, tail=tail, retrieval_queries=retrieval_queries)


def collect_pair_scores(
    features: Mapping[str, tuple[np.ndarray, np.ndarray]],
    yq: np.ndarray,
    yb: np.ndarray,
    pairs: Sequence[tuple[str, str]],
    retrieval_queries: np.ndarray | None = None,
    **kwargs: Any,
) -> dict[str, PairScores]:
    """`pair_scores` of each (query model, gallery model) pair, keyed "query/gallery"; inputs as in
    evaluate.compatibility_table (features[model] = (query feats, gallery feats)). kwargs go to `pair_scores`."""
    unknown = sorted({m for p in pairs for m in p} - set(features))
    if unknown:
        raise ValueError(f"no features for model(s) {unknown}; known: {sorted(features)}")
    return {
        f"{q}/{g}": pair_scores(features[q][0], yq, features[g][1], yb, retrieval_queries=retrieval_queries, **kwargs)
        for q, g in pairs
    }


# ------------------------------------------------------------------------------------------------ bootstrap


def identity_resamples(yq: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Query weights [R, n_q] (int32) of R identity resamples: each resample draws the n_id query identities with
    replacement from default_rng(seed); a query's weight is the number of times its identity was drawn."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    _, inverse = np.unique(np.asarray(yq).ravel(), return_inverse=True)
    n_id = int(inverse.max()) + 1 if inverse.size else 0
    if n_id == 0:
        raise ValueError("no queries to resample")
    draws = np.random.default_rng(seed).integers(0, n_id, size=(n_resamples, n_id))  # [R, n_id]
    offsets = (np.arange(n_resamples) * n_id)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_id).reshape(n_resamples, n_id)
    return counts[:, inverse].astype(np.int32)  # [R, n_q]


class Interval(NamedTuple):
    """A full-sample value and its bootstrap percentile interval; a plain (point, lo, hi) tuple too."""

    point: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, float | None]:
        return {"point": _json_float(self.point), "lo": _json_float(self.lo), "hi": _json_float(self.hi)}

    def cell(self) -> str:
        return f"{_fmt(self.point)} [{_fmt(self.lo)}, {_fmt(self.hi)}]"


def negative_flips(ref_correct: np.ndarray, cand_correct: np.ndarray) -> dict[str, float]:
    """Negative flips from a reference (old/old) to a candidate (new/old or new/new), per-query top-1 booleans
    (Yan et al., CVPR 2021). ``nfr``: share of ALL queries right under ref and wrong under cand (Yan's NFR);
    ``nf_share``: share of the ref-correct queries that become wrong (NaN when none is ref-correct)."""
    ref, cand = np.asarray(ref_correct, dtype=bool).ravel(), np.asarray(cand_correct, dtype=bool).ravel()
    if ref.shape != cand.shape or ref.size == 0:
        raise ValueError(f"ref and cand must be non-empty and of one length, got {ref.size} and {cand.size}")
    flips = int((ref & ~cand).sum())
    n_ref = int(ref.sum())
    return {"nfr": flips / ref.size, "nf_share": flips / n_ref if n_ref else math.nan}


def diff_name(a: str, b: str) -> str:
    return f"{a} - {b}"


def flip_name(ref: str, cand: str) -> str:
    return f"{ref} -> {cand}"


@dataclass(frozen=True)
class Bootstrap:
    """Intervals per pair and metric, per requested difference, and per negative-flip comparison.

    ``samples[(row, metric)]`` holds the R resampled values behind each interval (row: a pair, a difference or a
    flip comparison name); it is left out of `to_dict`."""

    intervals: dict[str, dict[str, Interval]]  # pair -> metric -> interval
    differences: dict[str, dict[str, Interval]]  # "a - b" -> metric -> interval of M_a − M_b
    flips: dict[str, dict[str, Interval]]  # "ref -> cand" -> {"nfr", "nf_share"}
    n_resamples: int
    level: float
    seed: int
    n_identities: int
    n_queries: int
    samples: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        def rows(d: dict[str, dict[str, Interval]]) -> dict:
            return {name: {m: iv.to_dict() for m, iv in row.items()} for name, row in d.items()}

        return {
            "method": "paired percentile bootstrap over query identities (gallery fixed)",
            "n_resamples": self.n_resamples,
            "level": self.level,
            "seed": self.seed,
            "n_identities": self.n_identities,
            "n_queries": self.n_queries,
            "intervals": rows(self.intervals),
            "differences": rows(self.differences),
            "negative_flips": rows(self.flips),
        }

    def markdown(self) -> str:
        def table(label: str, d: dict[str, dict[str, Interval]], sign: bool = False) -> str:
            cols = list(dict.fromkeys(m for row in d.values() for m in row))
            body = []
            for name, row in d.items():
                cells = []
                for m in cols:
                    iv = row.get(m)
                    mark = "" if iv is None or not sign else " ▲" if iv.lo > 0 else " ▼" if iv.hi < 0 else ""
                    cells.append("" if iv is None else iv.cell() + mark)
                body.append([name, *cells])
            return _markdown_table([label, *cols], body, "right")

        pct = f"{100 * self.level:g}%"
        head = (
            f"Bootstrap: {pct} percentile intervals, {self.n_resamples} paired resamples of "
            f"{self.n_identities} query identities ({self.n_queries} queries), seed {self.seed}; "
            "cells are value [lo, hi]."
        )
        parts = [head, "", table("query/gallery", self.intervals)]
        if self.differences:
            parts += [
                "",
                "▲: the whole interval is above 0, ▼: below 0.",
                "",
                table("difference", self.differences, True),
            ]
        if self.flips:
            parts += [
                "",
                "Negative flips at top-1 (Yan et al., CVPR 2021):",
                "",
                table("reference -> candidate", self.flips),
            ]
        return "\n".join(parts) + "\n"


def _percentile_interval(point: float, samples: np.ndarray, level: float) -> Interval:
    alpha = 1.0 - level
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])  # NaN if any resample is NaN
    return Interval(float(point), float(lo), float(hi))


def _weighted_means(w: np.ndarray, values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Σ w·v / Σ w per resample over the masked queries: [R]."""
    if mask is not None:
        w, values = w[:, mask], values[mask]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ values.astype(np.float64)) / w.sum(axis=1)


def bootstrap_intervals(
    pairs: Mapping[str, PairScores],
    yq: np.ndarray,
    diffs: Sequence[tuple[str, str]] = (),
    flips: Sequence[tuple[str, str]] = (),
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Bootstrap:
    """Paired bootstrap over query identities (module docstring): every metric of every pair, every difference
    (a, b) -> M_a − M_b and every negative-flip comparison (ref, cand) at top-1, on the same R resamples.

    E.g. ``diffs=[("new/old", "old/old"), ("new/new", "old/old")], flips=[("old/old", "new/old")]``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    yq = np.asarray(yq).ravel()
    for name, ps in pairs.items():
        if ps.n_queries != len(yq) or (ps.tail is not None and ps.tail.n_queries != len(yq)):
            raise ValueError(f"pair {name!r} has {ps.n_queries} queries, yq has {len(yq)}")
    unknown = sorted({p for d in (*diffs, *flips) for p in d} - set(pairs))
    if unknown:
        raise ValueError(f"unknown pair(s) {unknown}; known: {sorted(pairs)}")

    w = identity_resamples(yq, n_resamples, seed)  # [R, n_q] int32
    wf = w.astype(np.float64)
    points: dict[tuple[str, str], float] = {}
    samples: dict[tuple[str, str], np.ndarray] = {}
    for name, ps in pairs.items():
        mask = ps.retrieval_queries
        for metric, v in ps.per_query.items():
            points[name, metric] = float(np.mean(v if mask is None else v[mask]))
            samples[name, metric] = _weighted_means(wf, v, mask)
        if ps.tail is not None:
            full, resampled = tar_at_far(ps.tail), tar_at_far(ps.tail, w)
            for j, far in enumerate(ps.tail.fars):
                points[name, tar_name(far)] = float(full[j])
                samples[name, tar_name(far)] = resampled[:, j]

    def interval(key: tuple[str, str]) -> Interval:
        return _percentile_interval(points[key], samples[key], level)

    intervals = {name: {m: interval((n, m)) for n, m in points if n == name} for name in pairs}
    differences: dict[str, dict[str, Interval]] = {}
    for a, b in diffs:
        row = diff_name(a, b)
        differences[row] = {}
        for m in (m for m in intervals[a] if m in intervals[b]):
            points[row, m] = points[a, m] - points[b, m]
            samples[row, m] = samples[a, m] - samples[b, m]
            differences[row][m] = interval((row, m))
    flip_rows: dict[str, dict[str, Interval]] = {}
    for ref, cand in flips:
        r_ps, c_ps = pairs[ref], pairs[cand]
        mask = r_ps.retrieval_queries
        if not _same_mask(mask, c_ps.retrieval_queries):
            raise ValueError(f"{ref!r} and {cand!r} average top-1 over different queries: no per-query flips")
        top1 = topk_name(1)
        if top1 not in r_ps.per_query or top1 not in c_ps.per_query:
            raise ValueError(f"negative flips need {top1!r} in both {ref!r} and {cand!r}")
        r_ok, c_ok = r_ps.per_query[top1].astype(bool), c_ps.per_query[top1].astype(bool)
        keep = slice(None) if mask is None else mask
        point = negative_flips(r_ok[keep], c_ok[keep])
        flip = (r_ok & ~c_ok).astype(np.float64)
        wm = wf if mask is None else wf[:, mask]
        n_flip = wm @ flip[keep]
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled = {"nfr": n_flip / wm.sum(axis=1), "nf_share": n_flip / (wm @ r_ok[keep].astype(np.float64))}
        row = flip_name(ref, cand)
        for m in ("nfr", "nf_share"):
            points[row, m], samples[row, m] = point[m], resampled[m]
        # nf_share is undefined on a resample without a reference-correct query: those resamples are left out
        # (the interval is conditional on at least one; at the default size that never happens).
        share = samples[row, "nf_share"]
        flip_rows[row] = {
            "nfr": interval((row, "nfr")),
            "nf_share": _percentile_interval(points[row, "nf_share"], share[~np.isnan(share)], level)
            if (~np.isnan(share)).any() else _percentile_interval(points[row, "nf_share"], share, level),
        }
    return Bootstrap(
        intervals=intervals,
        differences=differences,
        flips=flip_rows,
        n_resamples=n_resamples,
        level=level,
        seed=seed,
        n_identities=len(np.unique(yq)),
        n_queries=len(yq),
        samples=samples,
    )


def _same_mask(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


# ------------------------------------------------------------------------------------------- partial backfill


def confusability(xb_old: np.ndarray, yb: np.ndarray) -> np.ndarray:
    """[n_g]: cosine of each gallery row's old embedding to the nearest old gallery row of ANOTHER identity
    (−inf when there is none). High = the old model separates that row worst. Exact, O(n_g²·d) in blocks."""
    xb, _, _, yb = _check_inputs(xb_old, yb, xb_old, yb)
    out = np.full(len(xb), -np.inf, dtype=np.float64)
    for blk in _blocks(len(xb), len(xb)):
        s = xb[blk] @ xb.T  # [b, n_g]
        s[yb[blk, None] == yb[None, :]] = -np.inf  # self and same identity never count
        out[blk] = s.max(axis=1)
    return out


def backfill_order(xb_old: np.ndarray, yb: np.ndarray, order: str = "random", seed: int = 0) -> np.ndarray:
    """Permutation of the gallery rows, the first re-embedded first: "random" (default_rng(seed).permutation)
    or "worst_first" (descending `confusability`, ties in row order)."""
    n_g = len(np.asarray(yb).ravel())
    if order == "random":
        return np.random.default_rng(seed).permutation(n_g)
    if order == "worst_first":
        return np.argsort(-confusability(xb_old, yb), kind="stable")
    raise ValueError(f"unknown backfill order {order!r}; known: {list(ORDERS)}")


@dataclass(frozen=True)
class BackfillCurve:
    """Metrics of new queries against a gallery whose first n_backfilled rows (in `order`) are new embeddings."""

    order: str
    betas: tuple[float, ...]
    n_backfilled: tuple[int, ...]
    values: dict[str, tuple[float, ...]]  # metric -> value at each β
    old_old: dict[str, float]
    auc: dict[str, float]  # trapezoid over β / (β_max − β_min)
    dips_by_metric: dict[str, bool]  # some M(β) < old/old (NaN never dips)
    minimum: dict[str, tuple[float, float]]  # metric -> (lowest value, the first β where it occurs)

    @property
    def dips(self) -> bool:
        return any(self.dips_by_metric.values())

    def to_dict(self) -> dict:
        return {
            "order": self.order,
            "betas": list(self.betas),
            "n_backfilled": list(self.n_backfilled),
            "values": {m: [_json_float(v) for v in vals] for m, vals in self.values.items()},
            "old_old": {m: _json_float(v) for m, v in self.old_old.items()},
            "auc": {m: _json_float(v) for m, v in self.auc.items()},
            "dips": self.dips,
            "dips_by_metric": dict(self.dips_by_metric),
            "minimum": {m: {"value": _json_float(v), "beta": b} for m, (v, b) in self.minimum.items()},
        }

    def markdown(self) -> str:
        cols = list(self.values)
        body = [[f"{b:g}", *(_fmt(self.values[m][i]) for m in cols)] for i, b in enumerate(self.betas)]
        body.append(["old/old", *(_fmt(self.old_old.get(m)) for m in cols)])
        body.append(["AUC", *(_fmt(self.auc[m]) for m in cols)])
        lines = [f"Partial backfill, order {self.order!r} (β = share of gallery rows re-embedded by the new model):"]
        lines += ["", _markdown_table(["β", *cols], body, "right"), ""]
        for m in cols:
            value, beta = self.minimum[m]
            verdict = "dips below old/old" if self.dips_by_metric[m] else "never below old/old"
            lines.append(f"- {m}: {verdict} (minimum {_fmt(value)} at β = {beta:g})")
        return "\n".join(lines) + "\n"


def _check_betas(betas: Sequence[float]) -> tuple[float, ...]:
    betas = tuple(float(b) for b in betas)
    if len(betas) < 2 or any(not 0 <= b <= 1 for b in betas) or any(b >= c for b, c in itertools.pairwise(betas)):
        raise ValueError(f"betas must be >= 2 strictly increasing values in [0, 1], got {betas}")
    return betas


def backfill_curve(
    xq_new: np.ndarray,
    yq: np.ndarray,
    xb_old: np.ndarray,
    xb_new: np.ndarray,
    yb: np.ndarray,
    old_old: Mapping[str, float],
    order: str | np.ndarray = "random",
    betas: Sequence[float] = BETAS,
    far: float = 1e-3,
    seed: int = 0,
    max_pairs: int = MAX_PAIRS,
) -> BackfillCurve:
    """Top-1 and TAR@far of new queries against a partly backfilled gallery, at each β (FastFill's curve).

    ``order``: "random", "worst_first" (see `backfill_order`) or an explicit permutation of the gallery rows.
    Row ``order[:round(β·n_g)]`` of the gallery holds the new embedding. Top-1 comes from
    ``evaluate.retrieval_metrics``; TAR from `score_tail`/`tar_at_far`, equal to ``evaluate.verification_metrics``
    (same scores, same impostor sample for `seed`/`max_pairs`) at ~10× its speed. ``old_old`` holds the old/old
    values of these metrics (e.g. CompatibilityTable.rows[("old", "old")]): the line the curve must not dip under.
    """
    betas = _check_betas(betas)
    xb_old, xb_new = np.asarray(xb_old), np.asarray(xb_new)
    yb = np.asarray(yb).ravel()
    if xb_old.shape != xb_new.shape or len(yb) != len(xb_old):
        raise ValueError(f"old gallery {xb_old.shape}, new gallery {xb_new.shape} and {len(yb)} labels differ")
    n_g = len(xb_old)
    if isinstance(order, str):
        name, perm = order, backfill_order(xb_old, yb, order, seed)
    else:
        name, perm = "custom", np.asarray(order).ravel()
        if not np.array_equal(np.sort(perm), np.arange(n_g)):
            raise ValueError(f"order must be a permutation of the {n_g} gallery rows")
    top1, tar = topk_name(1), tar_name(far)
    missing = [m for m in (top1, tar) if m not in old_old]
    if missing:
        raise ValueError(f"old_old lacks {missing}; it has {sorted(old_old)}")

    n_new = tuple(math.floor(b * n_g + 0.5) for b in betas)
    values: dict[str, list[float]] = {top1: [], tar: []}
    for n in n_new:
        xb = xb_old.copy()
        xb[perm[:n]] = xb_new[perm[:n]]
        values[top1].append(retrieval_metrics(xq_new, yq, xb, yb, ks=(1,), map_cutoff=1)[top1])
        tail = score_tail(xq_new, yq, xb, yb, fars=(far,), max_pairs=max_pairs, seed=seed)
        values[tar].append(float(tar_at_far(tail)[0]))

    span = betas[-1] - betas[0]
    auc, dips, minimum = {}, {}, {}
    for m, vals in values.items():
        v = np.asarray(vals, dtype=np.float64)
        auc[m] = float(np.trapezoid(v, betas) / span)
        dips[m] = bool(np.any(v < float(old_old[m])))  # NaN compares False
        if np.isnan(v).all():
            minimum[m] = (math.nan, math.nan)
        else:
            i = int(np.nanargmin(v))
            minimum[m] = (float(v[i]), betas[i])
    return BackfillCurve(
        order=name,
        betas=betas,
        n_backfilled=n_new,
        values={m: tuple(v) for m, v in values.items()},
        old_old={m: float(old_old[m]) for m in values},
        auc=auc,
        dips_by_metric=dips,
        minimum=minimum,
    )


def backfill_curves(
    xq_new: np.ndarray,
    yq: np.ndarray,
    xb_old: np.ndarray,
    xb_new: np.ndarray,
    yb: np.ndarray,
    old_old: Mapping[str, float],
    orders: Sequence[str] = ORDERS,
    **kwargs: Any,
) -> dict[str, BackfillCurve]:
    """`backfill_curve` for each order, keyed by order name (kwargs: betas, far, seed, max_pairs)."""
    return {o: backfill_curve(xq_new, yq, xb_old, xb_new, yb, old_old, order=o, **kwargs) for o in orders}
