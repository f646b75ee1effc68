"""Gallery indexes for search at any size: faiss's index factory, with the approximate index measured against exact
search on the same queries (issue "Past one process", item 4).

`evaluate.index` is a faiss index-factory string (https://github.com/facebookresearch/faiss/wiki/The-index-factory):
"Flat" (exact, the default), "IVF4096,Flat", "IVF4096,PQ32", "HNSW32", ...; `evaluate.index_params` sets its search
knobs with faiss's ParameterSpace syntax ("nprobe=32", "efSearch=128"). Embeddings are L2-normalised, so the metric
is inner product = cosine. An index that needs training (IVF, PQ) is trained on a seeded sample of the gallery
(`train_rows`, all rows when fewer), so the same gallery gives the same index.

`compare_with_exact` reports, beside every metric an approximate index produced: its recall@1 against exact search
on the same queries (the share of queries whose nearest gallery row is the exact one), and both query throughputs,
measured one after the other in the same process and thread count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np

EXACT = "Flat"
TRAIN_ROWS = 262_144  # IVF/PQ training sample: 64 × 4,096 lists, faiss's recommended ≥ 39 points per centroid


class GalleryTooSmall(ValueError):
    """The index cannot be trained on so few gallery rows (IVF needs at least one per list)."""


def is_exact(factory: str) -> bool:
    return factory.replace(" ", "") in ("Flat", "IDMap,Flat")


def build_index(
    xb: np.ndarray, factory: str = EXACT, params: str = "", train_rows: int = TRAIN_ROWS, seed: int = 0
) -> faiss.Index:
    """A faiss index over the (L2-normalised, float32) gallery `xb` [n, d], inner-product metric."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if xb.ndim != 2 or not len(xb):
        raise ValueError(f"the gallery must be a non-empty [n, d] array, got shape {xb.shape}")
    if is_exact(factory) and not params:
        index = faiss.IndexFlatIP(xb.shape[1])  # exact search, as every earlier run did it
        index.add(xb)
        return index
    try:
        index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:  # faiss raises RuntimeError with its C++ message
        raise ValueError(f"evaluate.index: {factory!r} is not a faiss index factory string ({_first_line(err)})") from None
    if not index.is_trained:
        sample = xb
        if len(xb) > train_rows:
            rows = np.sort(np.random.default_rng(seed).choice(len(xb), train_rows, replace=False))
            sample = xb[rows]
        try:
            index.train(sample)
        except RuntimeError as err:
            raise GalleryTooSmall(f"evaluate.index: {factory!r} cannot be trained on {len(sample):,} gallery rows "
                             f"({_first_line(err)})") from None  # fmt: skip
    index.add(xb)
    set_search_params(index, factory, params)
    return index


def set_search_params(index: faiss.Index, factory: str, params: str) -> None:
    """Set an index's search knobs (faiss ParameterSpace syntax: "nprobe=32", "efSearch=128") after it is built."""
    if not params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as err:
        raise ValueError(f"evaluate.index_params: {params!r} does not apply to {factory!r} ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def timed_search(index: faiss.Index, xq: np.ndarray, k: int, block: int = 4_096) -> tuple[np.ndarray, np.ndarray, float]:
    """(scores [n, k], gallery rows [n, k], seconds) of searching `xq` in blocks of queries."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    scores = np.empty((len(xq), k), dtype=np.float32)
    rows = np.empty((len(xq), k), dtype=np.int64)
    tic = time.perf_counter()
    for start in range(0, len(xq), block):
        scores[start : start + block], rows[start : start + block] = index.search(xq[start : start + block], k)
    return scores, rows, time.perf_counter() - tic


@dataclass(frozen=True)
class IndexReport:
    factory: str
    params: str
    queries: int
    gallery: int
    recall_at_1: float  # share of queries whose top-1 row is exact search's top-1 row
    qps: float  # the index's queries per second
    exact_qps: float  # exact (flat) search's queries per second, same queries, same threads

    @property
    def speedup(self) -> float:
        return self.qps / self.exact_qps

    def as_metrics(self) -> dict[str, float]:
        return {"index.recall@1": self.recall_at_1, "index.qps": self.qps, "exact.qps": self.exact_qps}


def recall_at_1(approx_rows: np.ndarray, exact_rows: np.ndarray, approx_scores: np.ndarray | None = None,
                exact_scores: np.ndarray | None = None) -> float:  # fmt: skip
    """Share of queries whose nearest row from the index is exact search's nearest row. A tie (another row with the
    exact top score, to float precision) counts as found: both are equally near."""
    hit = approx_rows[:, 0] == exact_rows[:, 0]
    if approx_scores is not None and exact_scores is not None:
        hit |= np.isclose(approx_scores[:, 0], exact_scores[:, 0], rtol=0, atol=1e-6) & (approx_rows[:, 0] >= 0)
    return float(hit.mean()) if len(hit) else float("nan")


def exact_search(xq: np.ndarray, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact top-1 (scores, rows, seconds) of `xq` over `xb`: what `compare_with_exact` measures an index against."""
    return timed_search(build_index(xb), xq, 1)


def compare_with_exact(
    index: faiss.Index, xq: np.ndarray, xb: np.ndarray, factory: str, params: str = "",
    exact: tuple[np.ndarray, np.ndarray, float] | None = None,
) -> IndexReport:  # fmt: skip
    """Recall@1 of `index` against exact search over `xb` on the queries `xq`, and both throughputs. `exact`: an
    `exact_search` result to reuse when several settings are compared on the same queries."""
    es, ei, t_exact = exact if exact is not None else exact_search(xq, xb)
    as_, ai, t_index = timed_search(index, xq, 1)
    return IndexReport(factory, params, len(xq), len(xb), recall_at_1(ai, ei, as_, es), len(xq) / t_index,
                       len(xq) / t_exact)  # fmt: skip
