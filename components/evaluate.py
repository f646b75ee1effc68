"""Cross-model retrieval and verification evaluation, and the backward-compatibility criterion.

Everything works on feature arrays that someone else extracted. A metric M(query model, gallery model) embeds the
queries with the first model and the gallery with the second; results are keyed by that pair, named
``"query/gallery"`` (``"new/old"`` is the cross-test). The criterion is BCT's (Shen et al., CVPR 2020,
arXiv:2003.11942): new/old > old/old and new/new > old/old, strictly, per metric (method.md).

Similarity is cosine: L2-normalised copies of the features searched with a flat inner-product faiss index. Call
``set_threads`` from the flow or CLI (never at import): faiss and torch each bring their own OpenMP pool.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pandas as pd
from rich.table import Table
from rich.text import Text
from sklearn.metrics import roc_curve

TOP_KS: tuple[int, ...] = (1, 5)
FARS: tuple[float, ...] = (1e-4, 1e-3, 1e-2)

# Above this gallery size mAP is computed on the top _DEFAULT_MAP_CUTOFF results unless map_cutoff says otherwise.
FULL_RANKING_MAX = 10_000
_DEFAULT_MAP_CUTOFF = 1_000
# Verification keeps every genuine pair; above this many query×gallery pairs impostors are subsampled.
MAX_PAIRS = 20_000_000
_ROC_POINTS = 500
_BLOCK_ELEMENTS = 1 << 22  # query rows × columns held at once (~16 MB of float32) when chunking


def topk_name(k: int) -> str:
    return f"top{k}"


def tar_name(far: float) -> str:
    """Canonical name of TAR at one FAR: 1e-4 -> "tar@far=1e-4", 0.25 -> "tar@far=2.5e-1"."""
    mantissa, exponent = f"{far:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"tar@far={mantissa}e{int(exponent)}"


METRICS: tuple[str, ...] = (*(topk_name(k) for k in TOP_KS), "mAP", *(tar_name(f) for f in FARS))


def pair_name(query: str, gallery: str) -> str:
    """Canonical name of a (query model, gallery model) pair: ("new", "old") -> "new/old"."""
    return f"{query}/{gallery}"


def set_threads(n: int) -> None:
    """Fix faiss's OpenMP thread count (torch has its own: set both explicitly)."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    faiss.omp_set_num_threads(int(n))


# --------------------------------------------------------------------------------------------------- inputs


def _normalized(x: np.ndarray, name: str) -> np.ndarray:
    """L2-normalised float32 C-contiguous copy (faiss.normalize_L2 works in place; the caller's array is untouched)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [n, d] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    faiss.normalize_L2(x)
    return x


def _check_inputs(
    xq: np.ndarray, yq: np.ndarray, xb: np.ndarray, yb: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    xq, xb = _normalized(xq, "xq"), _normalized(xb, "xb")
    yq, yb = np.asarray(yq).ravel(), np.asarray(yb).ravel()
    if xq.shape[1] != xb.shape[1]:
        raise ValueError(f"query dim {xq.shape[1]} != gallery dim {xb.shape[1]}: the models are not comparable")
    if len(yq) != len(xq) or len(yb) != len(xb):
        raise ValueError(f"labels do not match features: yq {len(yq)} vs xq {len(xq)}, yb {len(yb)} vs xb {len(xb)}")
    return xq, yq, xb, yb


def _check_identities(yq: np.ndarray, yb: np.ndarray) -> None:
    missing = np.setdiff1d(np.unique(yq), np.unique(yb))
    if missing.size:
        shown = ", ".join(repr(m.item() if hasattr(m, "item") else m) for m in missing[:10])
        more = f" (and {missing.size - 10} more)" if missing.size > 10 else ""
        raise ValueError(f"query identities absent from the gallery: {shown}{more}")


def _gallery_counts(yq: np.ndarray, yb: np.ndarray) -> np.ndarray:
    """Number of gallery items sharing each query's identity, [n_q]."""
    ids, counts = np.unique(yb, return_counts=True)
    pos = np.clip(np.searchsorted(ids, yq), 0, len(ids) - 1)
    return np.where(ids[pos] == yq, counts[pos], 0)


def _blocks(n: int, width: int) -> Iterator[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(width, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


# ------------------------------------------------------------------------------------------------ retrieval


_INDEX: tuple[str, str] = ("Flat", "")  # evaluate.index, evaluate.index_params (components.ann)


def set_index(factory: str = "Flat", params: str = "") -> None:
    """The gallery index every retrieval metric searches from now on (the evaluate stage sets it from its config
    and restores exact search after): a faiss index-factory string and its search parameters (components.ann)."""
    global _INDEX
    _INDEX = (factory, params)


def current_index() -> tuple[str, str]:
    return _INDEX


def _build_index(xb: np.ndarray) -> faiss.Index:
    """The gallery index (xb already L2-normalised: inner product = cosine): exact flat search unless
    evaluate.index names an approximate one, whose recall the evaluate stage reports beside the metrics. A gallery
    too small to train that index on (a few validation rows against IVF's lists) is searched exactly: with so few
    rows exact search is the cheaper one anyway, and the test gallery, where the index is measured, must train."""
    from components.ann import GalleryTooSmall, build_index

    try:
        return build_index(xb, *_INDEX)
    except GalleryTooSmall:
        return build_index(xb)


def _map_depth(n_gallery: int, map_cutoff: int | None) -> int:
    if map_cutoff is None:
        return n_gallery if n_gallery <= FULL_RANKING_MAX else _DEFAULT_MAP_CUTOFF
    if map_cutoff < 1:
        raise ValueError(f"map_cutoff must be >= 1, got {map_cutoff}")
    return min(map_cutoff, n_gallery)


def per_query_retrieval(
    xq: np.ndarray,
    yq: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    ks: Iterable[int] = TOP_KS,
    map_cutoff: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-query outcomes, each [n_q]: ``top{k}`` (bool: a same-identity item among the k nearest) and ``AP``.

    Kept separate from the means so that bootstrap intervals and negative-flip rates can resample queries.
    AP is over the ranked gallery truncated at depth K (the whole gallery when it has <= FULL_RANKING_MAX items,
    else map_cutoff, default 1000): AP@K = sum_{r<=K} P(r)·rel(r) / min(n_relevant, K), which is exact AP when
    K = n_gallery. Ties in score keep faiss's order.
    """
    xq, yq, xb, yb = _check_inputs(xq, yq, xb, yb)
    _check_identities(yq, yb)
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {ks}")
    n_g = len(xb)
    depth_ap = _map_depth(n_g, map_cutoff)
    depth = max(depth_ap, min(max(ks, default=1), n_g))
    n_rel = _gallery_counts(yq, yb)

    index = _build_index(xb)
    hits = {k: np.zeros(len(xq), dtype=bool) for k in ks}
    ap = np.zeros(len(xq), dtype=np.float64)
    ranks = np.arange(1, depth_ap + 1, dtype=np.float64)
    for blk in _blocks(len(xq), depth):
        _, I = index.search(xq[blk], depth)  # [b, depth], best first
        rel = yb[I] == yq[blk, None]  # [b, depth]
        for k in ks:
            hits[k][blk] = rel[:, : min(k, n_g)].any(axis=1)
        rel_ap = rel[:, :depth_ap]
        precision = np.cumsum(rel_ap, axis=1) / ranks  # [b, depth_ap]
        ap[blk] = (precision * rel_ap).sum(axis=1) / np.minimum(n_rel[blk], depth_ap)
    return {**{topk_name(k): hits[k] for k in ks}, "AP": ap}


def retrieval_metrics(
    xq: np.ndarray,
    yq: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    ks: Iterable[int] = TOP_KS,
    map_cutoff: int | None = None,
) -> dict[str, float]:
    """1:N identification with cosine similarity: ``top{k}`` for each k and ``mAP`` (see per_query_retrieval).

    Raises ValueError naming any query identity that has no gallery item (such a query can never be correct).
    """
    per_query = per_query_retrieval(xq, yq, xb, yb, ks=ks, map_cutoff=map_cutoff)
    out = {name: float(v.mean()) for name, v in per_query.items() if name != "AP"}
    out["mAP"] = float(per_query["AP"].mean())
    return out


# --------------------------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class PairSample:
    """Verification pairs scored without the query × gallery matrix: every genuine pair and, per query, a seeded
    uniform sample (with replacement) of `per_query` impostor pairs. What TAR@FAR is computed from when
    n_q·n_g > max_pairs (a 4,000 × 10^6 evaluation would need 4·10^9 scores)."""

    genuine: np.ndarray  # [G] float32 cosine
    genuine_query: np.ndarray  # [G] int64 query row
    impostor: np.ndarray  # [n_q · per_query] float32
    impostor_query: np.ndarray  # [n_q · per_query] int64
    impostor_row: np.ndarray  # [n_q · per_query] int64 gallery row
    per_query: int  # impostor pairs drawn per query
    impostor_total: int  # impostor pairs in the population (n_q·n_g − G)


def verification_pairs(yq: np.ndarray, yb: np.ndarray, max_pairs: int = MAX_PAIRS) -> dict[str, Any]:
    """How many pairs TAR@FAR rests on for these labels: every genuine pair and all impostor pairs, or (above
    max_pairs) `sample_pairs`' sample of them. Stated next to the numbers in metrics.json (`verification_pairs`)."""
    yq, yb = np.asarray(yq).ravel(), np.asarray(yb).ravel()
    genuine = int(_gallery_counts(yq, yb).sum())
    total = len(yq) * len(yb) - genuine
    sampled = len(yq) * len(yb) > max_pairs
    per_query = impostors_per_query(len(yq), genuine, max_pairs) if sampled else None
    impostor = per_query * len(yq) if per_query is not None else total
    text = (f"TAR@FAR from all {genuine:,} genuine pairs and "
            + (f"a seeded sample of {impostor:,} of the {total:,} impostor pairs ({per_query:,} per query)" if sampled
               else f"all {total:,} impostor pairs"))  # fmt: skip
    return {"genuine": genuine, "impostor": impostor, "impostor_total": total, "sampled": sampled,
            "per_query": per_query, "text": text}  # fmt: skip


def impostors_per_query(n_q: int, n_genuine: int, max_pairs: int) -> int:
    """Impostor draws per query so that about max_pairs pairs are scored in all, every genuine pair included."""
    return max(1, (max_pairs - n_genuine) // max(n_q, 1))


def _dots(xq: np.ndarray, xb: np.ndarray, q: np.ndarray, g: np.ndarray, chunk: int = 1 << 17) -> np.ndarray:
    """xq[q[i]] · xb[g[i]] for every i, in chunks (a gather of `chunk` gallery rows at a time)."""
    out = np.empty(len(q), dtype=np.float32)
    for start in range(0, len(q), chunk):
        gi = g[start : start + chunk]
        perm = np.argsort(gi, kind="stable")  # read a memory-mapped gallery in ascending row order
        rows = np.empty((len(gi), xb.shape[1]), dtype=np.float32)
        rows[perm] = xb[gi[perm]]
        out[start : start + len(gi)] = np.einsum("ij,ij->i", xq[q[start : start + chunk]], rows)
    return out


def sample_pairs(
    xq: np.ndarray, yq: np.ndarray, xb: np.ndarray, yb: np.ndarray, max_pairs: int, seed: int
) -> PairSample:
    """Every genuine pair (gallery rows grouped by identity) and, for each query in turn, `impostors_per_query`
    gallery rows drawn uniformly with replacement from ``default_rng(seed)``, a draw of the query's own identity
    drawn again. Cost: O((G + max_pairs)·d), never O(n_q·n_g)."""
    n_q, n_g = len(xq), len(xb)
    order = np.argsort(yb, kind="stable")
    ids = yb[order]
    lo, hi = np.searchsorted(ids, yq, side="left"), np.searchsorted(ids, yq, side="right")
    counts = (hi - lo).astype(np.int64)
    gen_q = np.repeat(np.arange(n_q, dtype=np.int64), counts)
    offsets = np.arange(gen_q.size, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    gen_g = order[np.repeat(lo, counts) + offsets]
    if np.any(counts == n_g):
        raise ValueError("a query's identity fills the whole gallery: it has no impostor pair to sample")
    k = impostors_per_query(n_q, int(counts.sum()), max_pairs)
    rng = np.random.default_rng(seed)
    imp_q = np.repeat(np.arange(n_q, dtype=np.int64), k)
    imp_g = rng.integers(0, n_g, size=imp_q.size)
    redraw = yb[imp_g] == yq[imp_q]
    while redraw.any():  # uniform over each query's impostor rows
        imp_g[redraw] = rng.integers(0, n_g, size=int(redraw.sum()))
        redraw[redraw] = yb[imp_g[redraw]] == yq[imp_q[redraw]]
    return PairSample(
        genuine=_dots(xq, xb, gen_q, gen_g), genuine_query=gen_q,
        impostor=_dots(xq, xb, imp_q, imp_g), impostor_query=imp_q, impostor_row=imp_g,
        per_query=k, impostor_total=n_q * n_g - int(counts.sum()),
    )  # fmt: skip


def _pair_scores(
    xq: np.ndarray, yq: np.ndarray, xb: np.ndarray, yb: np.ndarray, max_pairs: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores of all genuine pairs and of all (or, above max_pairs, a seeded sample of: `sample_pairs`)
    impostor pairs."""
    n_pairs = len(xq) * len(xb)
    if n_pairs > max_pairs:
        sample = sample_pairs(xq, yq, xb, yb, max_pairs, seed)
        return sample.genuine, sample.impostor
    genuine, impostor = [], []
    for blk in _blocks(len(xq), len(xb)):  # every pair
        s = xq[blk] @ xb.T  # [b, n_g] cosine
        same = yq[blk, None] == yb[None, :]  # [b, n_g]
        genuine.append(s[same])
        impostor.append(s[~same])
    return np.concatenate(genuine), np.concatenate(impostor)


def _downsample_roc(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """At most n real ROC points, spread log-uniformly in FPR (the low-FAR end is what matters)."""
    positive = fpr[fpr > 0]
    if len(fpr) <= n or positive.size == 0:
        idx = np.arange(len(fpr))
    else:
        grid = np.logspace(np.log10(positive.min()), 0.0, n - 1)
        # the last point at or below each grid FPR: the best TAR that still meets that FAR
        idx = np.unique(np.concatenate([[0], np.searchsorted(fpr, grid, side="right") - 1, [len(fpr) - 1]]))
    return {"fpr": fpr[idx], "tpr": tpr[idx], "threshold": thr[idx]}


def verification_metrics(
    xq: np.ndarray,
    yq: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    fars: Iterable[float] = FARS,
    max_pairs: int = MAX_PAIRS,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """1:1 verification over all query×gallery pairs (genuine = same identity), score = cosine.

    Returns ``({tar@far=...: TAR}, {"fpr", "tpr", "threshold"})``. TAR at a FAR is the highest TAR whose FAR
    <= target, i.e. at the lowest threshold of sklearn's roc_curve that still meets the target. The ROC is
    downsampled to <= 500 real points, log-spaced in FPR, for plotting.

    When n_q·n_g > max_pairs, every genuine pair is kept and impostor pairs are sampled without computing the
    query × gallery matrix (`sample_pairs`: a seeded uniform draw per query, about max_pairs pairs in all): TARs
    are then estimates, reproducible for a given seed; `verification_pairs` says how many pairs they rest on. A FAR is NaN
    when the impostor pairs used cannot resolve it (n_impostor·FAR < 1).
    """
    xq, yq, xb, yb = _check_inputs(xq, yq, xb, yb)
    fars = tuple(float(f) for f in fars)
    genuine, impostor = _pair_scores(xq, yq, xb, yb, max_pairs, seed)
    if genuine.size == 0:
        raise ValueError("no genuine pair: query and gallery share no identity")
    out = {tar_name(f): math.nan for f in fars}
    if impostor.size == 0:
        return out, {"fpr": np.zeros(0), "tpr": np.zeros(0), "threshold": np.zeros(0)}
    y_true = np.concatenate([np.ones(genuine.size, dtype=np.int8), np.zeros(impostor.size, dtype=np.int8)])
    fpr, tpr, thr = roc_curve(y_true, np.concatenate([genuine, impostor]), drop_intermediate=False)
    for far in fars:
        if impostor.size * far < 1:
            continue  # NaN: fewer than one impostor pair per FAR step
        i = np.searchsorted(fpr, far, side="right") - 1  # fpr is non-decreasing; fpr[0] = 0
        out[tar_name(far)] = float(tpr[i])
    return out, _downsample_roc(fpr, tpr, thr, _ROC_POINTS)


def _evaluate(
    xq: np.ndarray, yq: np.ndarray, xb: np.ndarray, yb: np.ndarray, retrieval: np.ndarray | None = None
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    if retrieval is None:
        metrics = retrieval_metrics(xq, yq, xb, yb, ks=TOP_KS)
    else:  # 1:N metrics on the selected queries only; verification still sees every query
        metrics = retrieval_metrics(np.asarray(xq)[retrieval], np.asarray(yq)[retrieval], xb, yb, ks=TOP_KS)
    tars, roc = verification_metrics(xq, yq, xb, yb, fars=FARS)
    return {**metrics, **tars}, roc


def evaluate_pair(xq: np.ndarray, yq: np.ndarray, xb: np.ndarray, yb: np.ndarray) -> dict[str, float]:
    """Every metric in METRICS for queries xq (one model) against gallery xb (the same or another model)."""
    return _evaluate(xq, yq, xb, yb)[0]


# ------------------------------------------------------------------------------------------- compatibility


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return "NaN" if math.isnan(v) else f"{v:.4f}"


def _json_float(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def _markdown_table(header: Sequence[str], body: Sequence[Sequence[str]], align: str) -> str:
    """A markdown table of cells formatted already ("0.9305", "NaN", "✓"): no number parsing, so tabulate keeps
    them as written; the first column (labels) left-aligned, the others `align`ed."""
    table = pd.DataFrame([list(row) for row in body], columns=list(header))
    return table.to_markdown(index=False, colalign=("left", *[align] * (len(header) - 1)), disable_numparse=True)


@dataclass(frozen=True)
class CompatibilityTable:
    """Metrics per (query model, gallery model) pair, with the ROC points of each pair."""

    rows: dict[tuple[str, str], dict[str, float]]
    rocs: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metric columns: canonical ones first, in METRICS order, then any others."""
        seen = [m for row in self.rows.values() for m in row]
        return (*(m for m in METRICS if m in seen), *dict.fromkeys(m for m in seen if m not in METRICS))

    def to_dict(self) -> dict:
        """JSON-friendly: {"new/old": {metric: value}}, NaN as None."""
        return {pair_name(*p): {m: _json_float(v) for m, v in row.items()} for p, row in self.rows.items()}

    @classmethod
    def from_dict(cls, pairs: Mapping[str, Mapping[str, float | None]]) -> CompatibilityTable:
        """Inverse of `to_dict` (ROC points are not kept there)."""
        rows = {tuple(name.split("/", 1)): {m: float("nan") if v is None else float(v) for m, v in vals.items()}
                for name, vals in pairs.items()}  # fmt: skip
        return cls(rows=rows)  # type: ignore[arg-type]

    def markdown(self, criterion: Criterion | None = None) -> str:
        cols = self.metrics
        body = [[pair_name(*pair), *(_fmt(row.get(m)) for m in cols)] for pair, row in self.rows.items()]
        lines = [_markdown_table(["query/gallery", *cols], body, "right")]
        if criterion is not None:
            lines += ["", criterion.markdown(cols)]
        return "\n".join(lines) + "\n"

    def rich_table(self, criterion: Criterion | None = None) -> Table:
        cols = self.metrics
        title = "Compatibility" if criterion is None else f"Compatibility: {'PASSED' if criterion.passed else 'FAILED'}"
        table = Table(title=title)
        # In a narrow terminal the labels wrap (folded, never cut to "paragon/p…") and the metric columns keep
        # their width: "tar@far=1…" three times over, or half a number, would hide which is which.
        table.add_column("query/gallery", overflow="fold")
        for m in cols:
            table.add_column(m, justify="right", no_wrap=True)
        for pair, row in self.rows.items():
            table.add_row(Text(pair_name(*pair)), *(_fmt(row.get(m)) for m in cols))  # Text: a name is not markup
        if criterion is not None:
            table.add_section()
            for label, cells in criterion.verdict_rows(cols):
                table.add_row(Text(label), *cells)
        return table


def compatibility_table(
    features: Mapping[str, tuple[np.ndarray, np.ndarray]],
    yq: np.ndarray,
    yb: np.ndarray,
    pairs: Sequence[tuple[str, str]],
    retrieval_queries: np.ndarray | None = None,
) -> CompatibilityTable:
    """Evaluate each (query model, gallery model) pair; features[model] = (query feats, gallery feats) of that
    model on the same query and gallery images, in the order of yq and yb.

    Every query must have a same-identity gallery item, unless ``retrieval_queries`` (bool [n_q]) selects the
    queries that the 1:N metrics (top-k, mAP) use: open-set data, where queries of identities absent from the
    gallery can never be retrieved but still count as impostors in the 1:1 TAR@FAR pairs."""
    if retrieval_queries is not None:
        retrieval_queries = np.asarray(retrieval_queries, dtype=bool).ravel()
        if retrieval_queries.shape != (len(yq),):
            raise ValueError(f"retrieval_queries has {retrieval_queries.size} entries for {len(yq)} queries")
    unknown = sorted({m for p in pairs for m in p} - set(features))
    if unknown:
        raise ValueError(f"no features for model(s) {unknown}; known: {sorted(features)}")
    rows, rocs = {}, {}
    for query, gallery in pairs:
        rows[(query, gallery)], rocs[(query, gallery)] = _evaluate(
            features[query][0], yq, features[gallery][1], yb, retrieval_queries
        )
    return CompatibilityTable(rows=rows, rocs=rocs)


Interval = tuple[float, float, float]  # (estimate, lower, upper)


def _fmt_points(iv: Sequence[float] | None) -> str:
    """A difference of shares in points with its interval: "+0.42 [−0.10, +0.93]"."""
    if iv is None:
        return ""
    est, lo, hi = (100 * float(v) for v in iv)
    if any(math.isnan(v) for v in (est, lo, hi)):
        return "NaN"
    return f"{est:+.2f} [{lo:+.2f}, {hi:+.2f}]"


@dataclass(frozen=True)
class Criterion:
    """BCT's empirical compatibility criterion, per metric, and the deployment gate built on it.

    With `intervals` (paired-bootstrap intervals of the differences, components.stats) and require="interval", a
    check passes only when the interval's lower bound is above 0: the improvement is resolved, not noise."""

    cross: dict[str, bool]  # new/old > old/old
    self_: dict[str, bool]  # new/new > old/old
    gate_metrics: tuple[str, ...]
    passed: bool  # every gate metric passes both checks
    reasons: list[str]  # one line per failed gate check, with the numbers
    update_gain: dict[str, float] | None = None  # (new/old − old/old) / (paragon − old/old)
    retention: dict[str, float] | None = None  # new/new / paragon
    new: str = "new"
    old: str = "old"
    paragon: str | None = None
    require: str = "point"  # "point": estimate > 0; "interval": lower bound > 0
    level: float | None = None  # confidence level of the intervals
    intervals: dict[str, dict[str, Interval]] | None = None  # {"cross"|"self": {metric: (est, lo, hi)}}

    def to_dict(self) -> dict:
        def floats(d: dict[str, float] | None) -> dict[str, float | None] | None:
            return None if d is None else {m: _json_float(v) for m, v in d.items()}

        out = {
            "passed": self.passed,
            "gate_metrics": list(self.gate_metrics),
            "cross": dict(self.cross),
            "self": dict(self.self_),
            "reasons": list(self.reasons),
            "update_gain": floats(self.update_gain),
            "retention": floats(self.retention),
            "models": {"new": self.new, "old": self.old, "paragon": self.paragon},
            "require": self.require,
        }
        if self.intervals is not None:
            out["level"] = self.level
            out["intervals"] = {side: {m: [_json_float(v) for v in iv] for m, iv in d.items()}
                                for side, d in self.intervals.items()}  # fmt: skip
        return out

    def verdict_rows(self, cols: Sequence[str]) -> list[tuple[str, list[str]]]:
        """(label, one cell per metric) rows: gate marks, cross and self verdicts, their intervals, update gain,
        retention."""
        n, o, p = self.new, self.old, self.paragon
        mark = {True: "✓", False: "✗"}
        how = " (CI low > 0)" if self.require == "interval" else ""
        rows = [
            ("gate", ["●" if m in self.gate_metrics else "" for m in cols]),
            (f"cross: {n}/{o} > {o}/{o}{how}", [mark[self.cross[m]] if m in self.cross else "" for m in cols]),
            (f"self: {n}/{n} > {o}/{o}{how}", [mark[self.self_[m]] if m in self.self_ else "" for m in cols]),
        ]
        if self.intervals is not None:
            pct = f"{100 * (self.level or 0):g}%"
            for side, label in (("cross", f"{n}/{o} − {o}/{o}"), ("self", f"{n}/{n} − {o}/{o}")):
                d = self.intervals.get(side, {})
                rows.append((f"{label}, points [{pct} CI]", [_fmt_points(d.get(m)) for m in cols]))
        if self.update_gain is not None:
            rows.append((f"update gain (vs {p}/{p})", [_fmt(self.update_gain.get(m)) for m in cols]))
        if self.retention is not None:
            rows.append((f"retention {n}/{n} ÷ {p}/{p}", [_fmt(self.retention.get(m)) for m in cols]))
        return rows

    def markdown(self, cols: Sequence[str] | None = None) -> str:
        cols = tuple(cols) if cols is not None else tuple(self.cross)
        body = [[label, *cells] for label, cells in self.verdict_rows(cols)]
        lines = [_markdown_table(["verdict", *cols], body, "center")]
        verdict = "PASSED" if self.passed else "FAILED"
        rule = "; each difference's interval above 0" if self.require == "interval" else ""
        lines += ["", f"**Compatibility gate ({', '.join(self.gate_metrics)}{rule}): {verdict}**"]
        lines += [f"- {r}" for r in self.reasons]
        return "\n".join(lines)


def criterion(
    table: CompatibilityTable,
    new: str = "new",
    old: str = "old",
    paragon: str | None = "paragon",
    gate_metrics: Sequence[str] = ("top1", tar_name(1e-3)),
    intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    require: str = "point",
    level: float | None = None,
) -> Criterion:
    """Apply new/old > old/old and new/new > old/old (strict: a tie fails; NaN fails) to every metric.

    require="interval" needs `intervals` {"cross": {metric: (est, lo, hi)}, "self": {...}}, the confidence
    intervals of new/old − old/old and new/new − old/old: a check then passes only when its lower bound is > 0.
    The gate passes when every gate metric passes both. Update gain and retention need a paragon/paragon row
    (a model trained with no compatibility term); without one they are None. A zero denominator gives NaN.
    """
    if require not in ("point", "interval"):
        raise ValueError(f"require must be 'point' or 'interval', got {require!r}")
    if require == "interval" and intervals is None:
        raise ValueError("require='interval' needs the intervals of the differences")
    need = {"old/old": (old, old), "new/old": (new, old), "new/new": (new, new)}
    missing = [pair_name(*p) for p in need.values() if p not in table.rows]
    if missing:
        raise ValueError(f"criterion needs rows {missing}; table has {[pair_name(*p) for p in table.rows]}")
    oo, no, nn = (table.rows[p] for p in need.values())
    metrics = [m for m in table.metrics if m in oo and m in no and m in nn]
    gate_metrics = tuple(gate_metrics)
    if not gate_metrics:
        raise ValueError("gate_metrics is empty: the gate would pass vacuously")
    unknown = [m for m in gate_metrics if m not in metrics]
    if unknown:
        raise ValueError(f"unknown gate metric(s) {unknown}; known: {metrics}")
    ivs: dict[str, dict[str, Interval]] | None = None
    if intervals is not None:
        ivs = {side: {m: tuple(float(v) for v in iv) for m, iv in intervals.get(side, {}).items()}  # type: ignore[misc]
               for side in ("cross", "self")}  # fmt: skip

    def ok(side: str, m: str, value: float) -> bool:
        if require == "point":
            return bool(value > oo[m])  # NaN compares False
        iv = ivs[side].get(m) if ivs else None  # type: ignore[index]
        return iv is not None and bool(iv[1] > 0)

    cross = {m: ok("cross", m, no[m]) for m in metrics}
    self_ = {m: ok("self", m, nn[m]) for m in metrics}
    reasons = []
    pct = f"{100 * (level or 0):g}%"
    for m in gate_metrics:
        for good, side, label, value in ((cross[m], "cross", f"{new}/{old}", no[m]), (self_[m], "self", f"{new}/{new}", nn[m])):
            if good:
                continue
            if math.isnan(value) or math.isnan(oo[m]):
                reasons.append(f"{m}: {label} {_fmt(value)} vs {old}/{old} {_fmt(oo[m])} (NaN: not measurable)")
            elif require == "interval" and value > oo[m]:
                iv = ivs[side].get(m) if ivs else None  # type: ignore[index]
                reasons.append(f"{m}: {label} − {old}/{old} = {_fmt_points(iv)} points ({pct} CI): "
                               "the interval reaches 0, the gain is not resolved")  # fmt: skip
            else:
                reasons.append(f"{m}: {label} {value:.4f} <= {old}/{old} {oo[m]:.4f}")

    update_gain = retention = None
    pp = table.rows.get((paragon, paragon)) if paragon is not None else None
    if pp is not None:
        # The share of the paragon's improvement that the cross-test keeps. Undefined (NaN) when the paragon does
        # not improve on old/old: there is no improvement to share, and a ratio over ~0 or < 0 means nothing.
        update_gain = {m: _ratio(no[m] - oo[m], pp[m] - oo[m]) if pp[m] > oo[m] else math.nan for m in metrics if m in pp}
        retention = {m: _ratio(nn[m], pp[m]) for m in metrics if m in pp}
    return Criterion(
        cross=cross,
        self_=self_,
        gate_metrics=gate_metrics,
        passed=not reasons,
        reasons=reasons,
        update_gain=update_gain,
        retention=retention,
        new=new,
        old=old,
        paragon=paragon if pp is not None else None,
        require=require,
        level=level if intervals is not None else None,
        intervals=ivs,
    )


def _ratio(num: float, den: float) -> float:
    return math.nan if den == 0 or math.isnan(num) or math.isnan(den) else num / den
