"""IJB-C-style template evaluation: 1:1 template verification and 1:N open-set identification, per model pair.

The protocol layout and the template feature are insightface's (deepinsight/insightface,
``recognition/_evaluation_/ijb/ijb_11.py``, ``recognition/_evaluation_/ijb/ijb_1n.py`` and
``recognition/arcface_torch/eval_ijbc.py``), under ``ROOT/meta/``:

- ``ijbc_face_tid_mid.txt``: one image per line, ``image_name template_id media_id``, space separated, no header.
  Its row order is the feature order (insightface reads the features from ``ijbc_name_5pts_score.txt`` in the
  same order).
- ``ijbc_template_pair_label.txt``: one 1:1 pair per line, ``template_id_1 template_id_2 label`` (1 genuine, 0 not).
- ``ijbc_1N_gallery_G1.csv``, ``ijbc_1N_gallery_G2.csv``, ``ijbc_1N_probe_mixed.csv``: CSV with a header; the
  columns used are ``TEMPLATE_ID`` and ``SUBJECT_ID`` (insightface reads columns 0 and 1 after the header), one row
  per image, so a template repeats. The other columns (``FILENAME``, ...) are kept as text.

Template feature (insightface ``image2template_feature``, test mode N1 F2): with flip-test the image and mirrored
image features are summed (``img_feats[:, :d] + img_feats[:, d:]``); image features are not normalised; the images of
one media (video frames, or one still) are averaged, the media means of a template are summed, and the sum is
L2-normalised. Insightface also multiplies each image by its detector score (D1) when it has
``ijbc_name_5pts_score.txt``; this layout carries no detector score, so a caller that has one multiplies first.

Where this module departs from insightface, on purpose:

- TAR@FAR is the largest TAR whose FAR <= the target (components.evaluate's rule); insightface takes the ROC point
  whose FPR is *nearest* the target, which may exceed it.
- 1:N is NIST open-set identification. Insightface concatenates G1 and G2 into one gallery, so every mixed probe is
  mated, and its "TPIR@FPIR" thresholds at the top (probe, wrong gallery template) pair scores. Here
  ``identify_templates`` searches the gallery it is given (one split or both); ``evaluate_protocol`` searches G1 and
  G2 separately when the protocol has both (the probes of the other split's subjects are then the non-mated
  searches), and averages each metric over the two galleries.

Search is faiss inner product on L2-normalised template features (components.evaluate's index); call
``components.evaluate.set_threads`` from the flow or CLI, never at import.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from components.errors import DataError, IncompatibleModel
from components.evaluate import _blocks, _build_index, _normalized, pair_name, tar_name
from components.io import atomic_path

FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
FPIRS: tuple[float, ...] = (0.01, 0.1)
RANKS: tuple[int, ...] = (1, 5, 10)
PAIRS: tuple[tuple[str, str], ...] = (("old", "old"), ("new", "old"), ("new", "new"))
SPLITS: tuple[str, ...] = ("G1", "G2")

_INT = re.compile(r"[+-]?\d+")
_COUNTS = ("pairs", "genuine_pairs", "impostor_pairs", "mated_probes", "nonmated_probes")


def rank_name(k: int) -> str:
    """Rank-k identification rate over mated probes: 1 -> "rank1"."""
    return f"rank{k}"


def tpir_name(fpir: float) -> str:
    """TPIR at one FPIR, numbers written as tar_name writes them: 0.01 -> "tpir@fpir=1e-2"."""
    return "tpir@fpir=" + tar_name(fpir).split("=", 1)[1]


@dataclass(frozen=True)
class Protocol:
    """An IJB-style protocol. Ids are int64; `images` row order is the feature row order.

    images: name, template, media. pairs: t1, t2, label (empty without a pair file). gallery: template, subject,
    split ("G1"/"G2"), then the file's other columns, one row per file row, G1 then G2. probes: template, subject,
    then the other columns. gallery and probes are empty without the 1:N files.
    """

    images: pd.DataFrame
    pairs: pd.DataFrame
    gallery: pd.DataFrame
    probes: pd.DataFrame
    root: Path


def _file_names(name: str) -> dict[str, str]:
    return {
        "images": f"{name}_face_tid_mid.txt",
        "pairs": f"{name}_template_pair_label.txt",
        "G1": f"{name}_1N_gallery_G1.csv",
        "G2": f"{name}_1N_gallery_G2.csv",
        "probes": f"{name}_1N_probe_mixed.csv",
    }


# ----------------------------------------------------------------------------------------------------- reading


def _scan_lines(path: Path, fields: Sequence[str], int_fields: Sequence[str]) -> None:
    """Line by line, raise DataError at the first malformed line (only run once the fast reader found a problem)."""
    blank = None
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                blank = blank or lineno
                continue
            if blank is not None:
                raise DataError(f"{path}, line {blank}: blank line inside the file")
            if len(parts) != len(fields):
                expected = f"{len(fields)} ({' '.join(fields)})"
                raise DataError(f"{path}, line {lineno}: {len(parts)} fields, expected {expected}")
            for field, value in zip(fields, parts, strict=True):
                if field in int_fields and not _INT.fullmatch(value):
                    raise DataError(f"{path}, line {lineno}: {field} {value!r} is not an integer")


def _read_lines(path: Path, fields: Sequence[str], int_fields: Sequence[str]) -> pd.DataFrame:
    """A space-separated text file without header (insightface's meta files); int fields as int64, others as str.

    The C parser reads the 15.6M IJB-C pairs in seconds; on any problem `_scan_lines` finds the line to name.
    """
    try:
        raw = pd.read_csv(path, sep=r"\s+", header=None, dtype=str, na_filter=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file, expected lines of {' '.join(fields)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        _scan_lines(path, fields, int_fields)
        raise DataError(f"{path}: cannot parse ({err})") from None
    while len(raw) and (raw.iloc[-1] == "").all():  # blank lines at the end carry nothing
        raw = raw.iloc[:-1]
    bad = raw.shape[1] != len(fields) or bool((raw == "").any(axis=None))
    if not bad:
        raw.columns = list(fields)
        bad = any(not raw[c].str.fullmatch(_INT.pattern).all() for c in int_fields)
    if bad:
        _scan_lines(path, fields, int_fields)
        raise DataError(f"{path}: malformed, expected lines of {' '.join(fields)}")
    out = pd.DataFrame({c: _as_int64(raw[c], f"{path}: {c}") if c in int_fields else raw[c] for c in fields})
    if out.empty:
        raise DataError(f"{path}: no lines, expected lines of {' '.join(fields)}")
    return out


def _as_int64(values: pd.Series, what: str) -> np.ndarray:
    try:
        return values.astype(np.int64).to_numpy()
    except (OverflowError, ValueError) as err:
        raise DataError(f"{what}: not a 64-bit integer ({err})") from None


def _read_subject_csv(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """A 1:N CSV: (frame with template, subject and the other columns as text, the file line of each row)."""
    try:
        return _parse_subject_csv(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None


def _parse_subject_csv(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in ("TEMPLATE_ID", "SUBJECT_ID") if c not in header]
        if missing:
            columns = ", ".join(header) or "none"
            raise DataError(f"{path}: header has no {' or '.join(missing)} column (columns: {columns})")
        rows, lines, blank = [], [], None
        for row in reader:
            if not any(cell.strip() for cell in row):
                blank = blank or reader.line_num
                continue
            if blank is not None:
                raise DataError(f"{path}, line {blank}: blank line inside the file")
            if len(row) != len(header):
                raise DataError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
            rows.append(row)
            lines.append(reader.line_num)
    raw = pd.DataFrame(rows, columns=header, dtype=str) if rows else pd.DataFrame(columns=header, dtype=str)
    lines = np.asarray(lines, dtype=np.int64)
    for col in ("TEMPLATE_ID", "SUBJECT_ID"):
        ok = raw[col].str.strip().str.fullmatch(_INT.pattern).to_numpy(dtype=bool)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise DataError(f"{path}, line {lines[i]}: {col} {raw[col].iloc[i]!r} is not an integer")
    out = pd.DataFrame(
        {
            "template": _as_int64(raw["TEMPLATE_ID"].str.strip(), f"{path}: TEMPLATE_ID"),
            "subject": _as_int64(raw["SUBJECT_ID"].str.strip(), f"{path}: SUBJECT_ID"),
        }
    )
    for col in header:
        if col not in ("TEMPLATE_ID", "SUBJECT_ID"):
            out[col] = raw[col].to_numpy()
    return out, lines


def _check_known(path: Path, column: str, values: np.ndarray, known: np.ndarray, lines: np.ndarray) -> None:
    """Every template named in a file must have images in the face file."""
    unknown = ~np.isin(values, known)
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise DataError(
            f"{path}, line {lines[i]}: {column} {values[i]} has no image in the face file "
            f"({int(unknown.sum())} rows name such templates)"
        )


def _check_one_subject(frame: pd.DataFrame, what: str) -> None:
    per_template = frame.groupby("template")["subject"].nunique()
    if (per_template > 1).any():
        t = per_template.index[per_template > 1][0]
        subjects = sorted(frame.loc[frame["template"] == t, "subject"].unique().tolist())
        raise DataError(f"{what}: template {t} belongs to several subjects {subjects}")


def read_protocol(root: str | Path, name: str = "ijbc") -> Protocol:
    """Read ``root/meta/{name}_*`` (see the module docstring). The face file is required; the pair file is
    optional; the three 1:N files are optional together. Every malformed line raises DataError naming file and line.
    """
    root = Path(root)
    meta = root / "meta"
    files = {k: meta / v for k, v in _file_names(name).items()}
    if not files["images"].is_file():
        raise DataError(f"{files['images']}: image list not found (lines: image_name template_id media_id)")
    images = _read_lines(files["images"], ("name", "template", "media"), ("template", "media"))
    known = np.unique(images["template"].to_numpy())

    pairs = pd.DataFrame({"t1": np.zeros(0, np.int64), "t2": np.zeros(0, np.int64), "label": np.zeros(0, np.int64)})
    if files["pairs"].is_file():
        pairs = _read_lines(files["pairs"], ("t1", "t2", "label"), ("t1", "t2", "label"))
        lines = np.arange(1, len(pairs) + 1)  # _read_lines keeps one row per line (no blank line inside)
        bad = ~np.isin(pairs["label"].to_numpy(), (0, 1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{files['pairs']}, line {lines[i]}: label {pairs['label'].iloc[i]} is not 0 or 1")
        for col in ("t1", "t2"):
            _check_known(files["pairs"], col, pairs[col].to_numpy(), known, lines)

    present = [k for k in ("G1", "G2", "probes") if files[k].is_file()]
    empty = pd.DataFrame({"template": np.zeros(0, np.int64), "subject": np.zeros(0, np.int64)})
    gallery, probes = empty.assign(split=pd.Series([], dtype=object)), empty
    if present and len(present) < 3:
        absent = [str(files[k]) for k in ("G1", "G2", "probes") if k not in present]
        raise DataError(f"{', '.join(absent)}: not found; the 1:N files come together (gallery G1, G2, probe_mixed)")
    if present:
        parts = []
        for split in SPLITS:
            frame, lines = _read_subject_csv(files[split])
            _check_known(files[split], "TEMPLATE_ID", frame["template"].to_numpy(), known, lines)
            frame.insert(2, "split", split)
            parts.append(frame)
        gallery = pd.concat(parts, ignore_index=True)
        _check_one_subject(gallery, f"{files['G1']} + {files['G2'].name}")
        probes, lines = _read_subject_csv(files["probes"])
        _check_known(files["probes"], "TEMPLATE_ID", probes["template"].to_numpy(), known, lines)
        _check_one_subject(probes, str(files["probes"]))
    return Protocol(images=images, pairs=pairs, gallery=gallery, probes=probes, root=root)


# ----------------------------------------------------------------------------------------------------- writing


def _int_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what}: no column {', '.join(missing)} (columns: {', '.join(map(str, frame.columns))})")
    out = frame.copy()
    for c in columns:
        values = pd.Series(frame[c])
        integer = pd.api.types.is_integer_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if values.isna().any() or not (integer or values.astype(str).str.fullmatch(_INT.pattern).all()):
            raise DataError(f"{what}: column {c} holds non-integer values")
        out[c] = values.astype(np.int64).to_numpy()
    return out


def _write_subject_csv(path: Path, frame: pd.DataFrame) -> None:
    out = frame.rename(columns={"template": "TEMPLATE_ID", "subject": "SUBJECT_ID"})
    out = out.drop(columns="split", errors="ignore")
    rest = [c for c in out.columns if c not in ("TEMPLATE_ID", "SUBJECT_ID")]
    with atomic_path(path) as tmp:
        out[["TEMPLATE_ID", "SUBJECT_ID", *rest]].to_csv(tmp, index=False)


def write_protocol(
    root: str | Path,
    images: pd.DataFrame,
    pairs: pd.DataFrame | None = None,
    gallery: pd.DataFrame | None = None,
    probes: pd.DataFrame | None = None,
    name: str = "ijbc",
) -> Path:
    """Write a protocol in the layout `read_protocol` reads, each file atomically; returns `root`.

    gallery rows go to G1 or G2 by their ``split`` column (all to G1, and G2 gets a header only, without one);
    its other columns and the probes' are written after TEMPLATE_ID, SUBJECT_ID. A file whose frame is None is not
    written (one already there stays). gallery and probes come together.
    """
    root = Path(root)
    meta = root / "meta"
    files = {k: meta / v for k, v in _file_names(name).items()}
    images = _int_columns(images, ("template", "media"), "images")
    if "name" not in images.columns:
        raise DataError(f"images: no column name (columns: {', '.join(map(str, images.columns))})")
    names = images["name"].astype(str)
    spaced = names.str.contains(r"\s") | (names == "")
    if spaced.any():
        bad = names[spaced].iloc[0]
        raise DataError(f"images: name {bad!r} is empty or holds whitespace (the fields are space-separated)")
    if (gallery is None) != (probes is None):
        raise DataError("gallery and probes: the 1:N files come together; give both or neither")
    with atomic_path(files["images"]) as tmp:
        lines = pd.DataFrame({"name": names, "template": images["template"], "media": images["media"]})
        lines.to_csv(tmp, sep=" ", header=False, index=False)
    if pairs is not None:
        pairs = _int_columns(pairs, ("t1", "t2", "label"), "pairs")
        if not pairs["label"].isin((0, 1)).all():
            raise DataError("pairs: column label holds values other than 0 and 1")
        with atomic_path(files["pairs"]) as tmp:
            pairs[["t1", "t2", "label"]].to_csv(tmp, sep=" ", header=False, index=False)
    if gallery is not None and probes is not None:
        gallery = _int_columns(gallery, ("template", "subject"), "gallery")
        probes = _int_columns(probes, ("template", "subject"), "probes")
        split = gallery["split"].astype(str) if "split" in gallery.columns else pd.Series("G1", index=gallery.index)
        unknown = ~split.isin(SPLITS)
        if unknown.any():
            raise DataError(f"gallery: column split holds {split[unknown].iloc[0]!r}, expected G1 or G2")
        for s in SPLITS:
            _write_subject_csv(files[s], gallery[(split == s).to_numpy()])
        _write_subject_csv(files["probes"], probes)
    return root


# ------------------------------------------------------------------------------------------- template features


def _template_features(
    features: np.ndarray, templates: np.ndarray, medias: np.ndarray, flip_features: np.ndarray | None, what: str
) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features)
    templates, medias = np.asarray(templates).ravel(), np.asarray(medias).ravel()
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"{what}: expected a non-empty [n_images, d] array, got shape {x.shape}")
    if len(templates) != len(x) or len(medias) != len(x):
        raise DataError(f"{what}: {len(x)} feature rows for {len(templates)} template ids and {len(medias)} media ids")
    for ids, field in ((templates, "template"), (medias, "media")):
        if not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"{what}: {field} ids must be integers, got dtype {ids.dtype}")
    x = x.astype(np.float64)
    if flip_features is not None:
        flip = np.asarray(flip_features, dtype=np.float64)
        if flip.shape != x.shape:
            raise DataError(f"{what}: flip features have shape {flip.shape}, the features {x.shape}")
        x = x + flip  # insightface F2: image + mirrored image, before any averaging
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise DataError(f"{what}: NaN or inf in row {int(np.flatnonzero(~finite)[0])} ({int((~finite).sum())} rows)")

    order = np.lexsort((medias, templates))  # by template, then media
    t, m, x = templates[order], medias[order], x[order]
    media_starts = np.flatnonzero(np.r_[True, (t[1:] != t[:-1]) | (m[1:] != m[:-1])])
    counts = np.diff(np.r_[media_starts, len(t)])
    media_mean = np.add.reduceat(x, media_starts, axis=0) / counts[:, None]  # [n_media, d]
    media_template = t[media_starts]
    template_starts = np.flatnonzero(np.r_[True, media_template[1:] != media_template[:-1]])
    summed = np.add.reduceat(media_mean, template_starts, axis=0)  # [T, d]
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    # A zero sum stays zero, as sklearn.preprocessing.normalize (insightface's) leaves it.
    normed = np.divide(summed, norms, out=np.zeros_like(summed), where=norms > 0)
    return media_template[template_starts].astype(np.int64), normed.astype(np.float32)


def template_features(
    features: np.ndarray, templates: np.ndarray, medias: np.ndarray, flip_features: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids [T] int64, template features [T, d] float32), insightface's ``image2template_feature``:
    features (+ flip_features) averaged per (template, media), the media means summed per template, L2-normalised.
    """
    return _template_features(features, templates, medias, flip_features, "features")


# ---------------------------------------------------------------------------------------------------- matching


def _side(side: tuple[np.ndarray, np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray]:
    ids, feats = np.asarray(side[0]).ravel(), np.asarray(side[1])
    if not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{what} template ids must be integers, got dtype {ids.dtype}")
    if feats.ndim != 2 or len(feats) != len(ids):
        raise DataError(f"{what}: {len(ids)} template ids for template features of shape {feats.shape}")
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{what}: template ids repeat")
    finite = np.isfinite(feats).all(axis=1)
    if not finite.all():
        raise DataError(f"{what}: NaN or inf in the features of template {ids[~finite][0]}")
    return ids.astype(np.int64), feats


def _same_dim(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise IncompatibleModel(f"{what}: feature dims {a.shape[1]} and {b.shape[1]} differ (models not comparable)")


def _lookup(ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Rows of `ids` holding each `wanted` template; DataError naming the first one absent."""
    order = np.argsort(ids, kind="stable")
    pos = np.clip(np.searchsorted(ids[order], wanted), 0, max(len(ids) - 1, 0))
    found = (ids[order][pos] == wanted) if len(ids) else np.zeros(len(wanted), dtype=bool)
    if not found.all():
        missing = np.unique(wanted[~found])
        raise DataError(f"{what}: template {missing[0]} has no template feature ({len(missing)} templates missing)")
    return order[pos]


def _tar_at_far(genuine: np.ndarray, impostor: np.ndarray, fars: Sequence[float]) -> dict[str, float]:
    """Largest TAR with FAR <= far (sklearn roc_curve); NaN where impostor pairs cannot resolve the FAR."""
    out = {tar_name(f): math.nan for f in fars}
    if genuine.size == 0 or impostor.size == 0:
        return out
    y = np.r_[np.ones(genuine.size, np.int8), np.zeros(impostor.size, np.int8)]
    fpr, tpr, _ = roc_curve(y, np.r_[genuine, impostor], drop_intermediate=False)
    for far in fars:
        if impostor.size * far >= 1:
            out[tar_name(far)] = float(tpr[np.searchsorted(fpr, far, side="right") - 1])  # fpr[0] = 0
    return out


def verify_templates(
    query: tuple[np.ndarray, np.ndarray],
    gallery: tuple[np.ndarray, np.ndarray],
    pairs: pd.DataFrame,
    fars: Sequence[float] = FARS,
) -> dict[str, float]:
    """1:1 template verification: score(t1, t2) = <query[t1], gallery[t2]>, so the cross-test passes the new
    model's templates as `query` and the old model's as `gallery`.

    Returns TAR at each FAR (``tar@far=1e-4``..., the largest TAR whose FAR <= target; NaN when
    impostor_pairs · FAR < 1, the FAR not resolvable) and the counts ``pairs``, ``genuine_pairs``, ``impostor_pairs``.
    """
    q_ids, xq = _side(query, "query")
    g_ids, xb = _side(gallery, "gallery")
    _same_dim(xq, xb, "query and gallery templates")
    p = _int_columns(pairs, ("t1", "t2", "label"), "pairs")
    if p.empty:
        raise DataError("pairs: no template pair to verify")
    label = p["label"].to_numpy()
    if not np.isin(label, (0, 1)).all():
        raise DataError("pairs: column label holds values other than 0 and 1")
    iq = _lookup(q_ids, p["t1"].to_numpy(), "pairs t1, query side")
    ig = _lookup(g_ids, p["t2"].to_numpy(), "pairs t2, gallery side")
    score = np.empty(len(p), dtype=np.float32)
    for blk in _blocks(len(p), xq.shape[1]):  # IJB-C has 15.6M pairs: gather a block of rows at a time
        score[blk] = np.einsum("ij,ij->i", xq[iq[blk]], xb[ig[blk]])
    genuine, impostor = score[label == 1], score[label == 0]
    return {
        **_tar_at_far(genuine, impostor, tuple(float(f) for f in fars)),
        "pairs": float(len(p)),
        "genuine_pairs": float(genuine.size),
        "impostor_pairs": float(impostor.size),
    }


def _subjects(frame: pd.DataFrame, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(templates [T] sorted, subject of each [T]) from rows that may repeat a template (one per image)."""
    frame = _int_columns(frame, ("template", "subject"), what)
    _check_one_subject(frame, what)
    unique = frame.drop_duplicates("template").sort_values("template")
    return unique["template"].to_numpy(), unique["subject"].to_numpy()


def identify_templates(
    gallery: tuple[np.ndarray, np.ndarray],
    gallery_subjects: pd.DataFrame,
    probe: tuple[np.ndarray, np.ndarray],
    probe_subjects: pd.DataFrame,
    fpirs: Sequence[float] = FPIRS,
    ranks: Sequence[int] = RANKS,
) -> dict[str, float]:
    """1:N open-set identification (NIST): every probe template of `probe_subjects` searched against the gallery
    templates of `gallery_subjects`, which form one gallery (a G1 or G2 split, or both).

    Mated probes are those whose subject has a gallery template. ``rank{k}``: share of mated probes with a
    template of their subject among the k best gallery templates. ``tpir@fpir=...``: with n non-mated probes and
    m = floor(fpir · n), the threshold t is the (m+1)-th best non-mated top-1 score, and TPIR is the share of mated
    probes whose best gallery template is their subject's and scores > t: at most m non-mated probes (a share
    <= fpir) raise an alarm. NaN when m < 1 (too few non-mated probes: see ``nonmated_probes``) or when no probe is
    mated. Also ``mated_probes`` and ``nonmated_probes``.
    """
    ranks = tuple(int(k) for k in ranks)
    fpirs = tuple(float(f) for f in fpirs)
    if any(k < 1 for k in ranks):
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if any(not 0 < f <= 1 for f in fpirs):
        raise ValueError(f"fpirs must be in (0, 1], got {fpirs}")
    g_ids, xb = _side(gallery, "gallery")
    p_ids, xq = _side(probe, "probe")
    _same_dim(xq, xb, "probe and gallery templates")
    g_t, g_s = _subjects(gallery_subjects, "gallery_subjects")
    p_t, p_s = _subjects(probe_subjects, "probe_subjects")
    if len(g_t) == 0 or len(p_t) == 0:
        raise DataError(f"1:N needs gallery and probe templates, got {len(g_t)} and {len(p_t)}")
    xb = _normalized(xb[_lookup(g_ids, g_t, "gallery_subjects, gallery side")], "gallery")  # [G, d]
    xq = _normalized(xq[_lookup(p_ids, p_t, "probe_subjects, probe side")], "probe")  # [P, d]

    depth = min(max(ranks, default=1), len(g_t))
    D, I = _build_index(xb).search(xq, depth)  # [P, depth], best first
    hit = g_s[I] == p_s[:, None]  # [P, depth]
    mated = np.isin(p_s, g_s)
    n_mated, n_nonmated = int(mated.sum()), int((~mated).sum())
    out: dict[str, float] = {}
    for k in ranks:
        out[rank_name(k)] = float(hit[mated, : min(k, depth)].any(axis=1).mean()) if n_mated else math.nan
    top1, correct1 = D[:, 0], hit[:, 0]
    nonmated_top1 = np.sort(top1[~mated])[::-1]
    for f in fpirs:
        alarms = math.floor(f * n_nonmated + 1e-9)  # non-mated probes allowed above threshold
        if n_mated == 0 or alarms < 1:
            out[tpir_name(f)] = math.nan
        elif alarms >= n_nonmated:
            out[tpir_name(f)] = float(correct1[mated].mean())
        else:
            out[tpir_name(f)] = float((correct1 & (top1 > nonmated_top1[alarms]))[mated].mean())
    out["mated_probes"], out["nonmated_probes"] = float(n_mated), float(n_nonmated)
    return out


def _identify_per_split(
    gallery: tuple[np.ndarray, np.ndarray], protocol: Protocol, probe: tuple[np.ndarray, np.ndarray]
) -> dict[str, float]:
    """NIST's IJB-C 1:N: G1 and G2 searched separately, each metric averaged over them, counts summed."""
    frame = protocol.gallery
    splits = frame["split"].unique().tolist() if "split" in frame.columns else []
    if len(splits) < 2:
        return identify_templates(gallery, frame, probe, protocol.probes)
    results = [identify_templates(gallery, frame[frame["split"] == s], probe, protocol.probes) for s in splits]
    return {
        key: float(sum(r[key] for r in results)) if key in _COUNTS else float(np.mean([r[key] for r in results]))
        for key in results[0]
    }


def evaluate_protocol(
    protocol: Protocol, features: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]] = PAIRS
) -> pd.DataFrame:
    """One row per (query model, gallery model), indexed by "query/gallery": 1:1 on protocol.pairs (query side =
    the first model) and 1:N with the first model's probe templates against the second model's gallery templates.

    features: model -> image features [n_images, d] in protocol.images row order (for flip-test pass image +
    mirror features: the sum is what insightface averages). A part without its files (no pairs; no 1:N files) has
    no columns. Columns: query, gallery, then the metrics of verify_templates and identify_templates.
    """
    unknown = sorted({m for p in pairs for m in p} - set(features))
    if unknown:
        raise DataError(f"features: no features for model(s) {unknown}; known: {sorted(features)}")
    images = protocol.images
    tids, mids = images["template"].to_numpy(), images["media"].to_numpy()
    models = dict.fromkeys(m for p in pairs for m in p)
    templates = {m: _template_features(features[m], tids, mids, None, f"features[{m!r}]") for m in models}
    has_11 = len(protocol.pairs) > 0
    has_1n = len(protocol.gallery) > 0 and len(protocol.probes) > 0
    if not (has_11 or has_1n):
        raise DataError(f"{protocol.root}: the protocol has neither 1:1 pairs nor 1:N gallery and probes")
    rows = []
    for query, gallery in pairs:
        row: dict[str, object] = {"query": query, "gallery": gallery}
        if has_11:
            row.update(verify_templates(templates[query], templates[gallery], protocol.pairs))
        if has_1n:
            row.update(_identify_per_split(templates[gallery], protocol, templates[query]))
        rows.append(row)
    return pd.DataFrame(rows, index=pd.Index([pair_name(q, g) for q, g in pairs], name="pair"))
