"""IJB-style template evaluation on hand-made protocols: template features, protocol files, 1:1 and 1:N metrics."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.errors import DataError
from components.evaluate import set_threads
from components.ijb import (
    Protocol,
    evaluate_protocol,
    identify_templates,
    read_protocol,
    template_features,
    verify_templates,
    write_protocol,
)


@pytest.fixture(autouse=True, scope="module")
def _threads() -> None:
    set_threads(1)


# ------------------------------------------------------------------------------------------- template features


def toy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template 7: media 10 (two images) and media 11 (one); template 3: media 12 (two images). Rows interleaved."""
    x = np.array([[2, 0, 0], [1, 2, 2], [0, 0, 4], [0, 2, 0], [3, 2, 2]], dtype=np.float32)
    templates = np.array([7, 3, 7, 7, 3])
    medias = np.array([10, 12, 11, 10, 12])
    return x, templates, medias


def test_template_features_average_media_then_sum_then_normalise() -> None:
    x, templates, medias = toy()
    ids, feats = template_features(x, templates, medias)
    assert ids.dtype == np.int64 and feats.dtype == np.float32
    np.testing.assert_array_equal(ids, [3, 7])
    # template 3: mean([1,2,2], [3,2,2]) = [2,2,2]; template 7: mean([2,0,0], [0,2,0]) + [0,0,4] = [1,1,4]
    np.testing.assert_allclose(feats[0], np.array([2, 2, 2]) / math.sqrt(12), rtol=1e-6)
    np.testing.assert_allclose(feats[1], np.array([1, 1, 4]) / math.sqrt(18), rtol=1e-6)
    # media-weighted, not image-weighted: the plain image mean of template 7 points along [1, 1, 2]
    assert feats[1] @ (np.array([1, 1, 2]) / math.sqrt(6)) < 0.97


def test_flip_features_are_summed_before_averaging() -> None:
    x, templates, medias = toy()
    flip = np.tile(np.array([0, 0, 1], dtype=np.float32), (len(x), 1))
    _, feats = template_features(x, templates, medias, flip_features=flip)
    # template 7: mean([2,0,1], [0,2,1]) + [0,0,5] = [1,1,6]; template 3: [2,2,3]
    np.testing.assert_allclose(feats[1], np.array([1, 1, 6]) / math.sqrt(38), rtol=1e-6)
    np.testing.assert_allclose(feats[0], np.array([2, 2, 3]) / math.sqrt(17), rtol=1e-6)
    np.testing.assert_allclose(feats, template_features(x + flip, templates, medias)[1])


def test_template_features_reject_bad_features() -> None:
    x, templates, medias = toy()
    with pytest.raises(DataError, match=r"5 feature rows for 4 template ids"):
        template_features(x, templates[:4], medias)
    x[3, 1] = np.nan
    with pytest.raises(DataError, match=r"NaN or inf in row 3"):
        template_features(x, templates, medias)


# ------------------------------------------------------------------------------------------------ protocol files


def small_protocol() -> dict[str, pd.DataFrame]:
    names = ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    images = pd.DataFrame({"name": names, "template": [1, 1, 2, 3], "media": [5, 6, 7, 8]})
    pairs = pd.DataFrame({"t1": [1, 1], "t2": [2, 3], "label": [1, 0]})
    gallery = pd.DataFrame(
        {"template": [1, 1, 2], "subject": [40, 40, 41], "split": ["G1", "G1", "G2"], "FILENAME": ["a", "b", "c"]}
    )
    probes = pd.DataFrame({"template": [3], "subject": [40], "FILENAME": ["d"]})
    return {"images": images, "pairs": pairs, "gallery": gallery, "probes": probes}


def test_protocol_round_trip(tmp_path: Path) -> None:
    frames = small_protocol()
    assert write_protocol(tmp_path, **frames) == tmp_path
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == [
        "ijbc_1N_gallery_G1.csv",
        "ijbc_1N_gallery_G2.csv",
        "ijbc_1N_probe_mixed.csv",
        "ijbc_face_tid_mid.txt",
        "ijbc_template_pair_label.txt",
    ]
    # insightface's layouts: "name tid mid" lines, "t1 t2 label" lines, CSVs led by TEMPLATE_ID,SUBJECT_ID
    assert (tmp_path / "meta/ijbc_face_tid_mid.txt").read_text().splitlines()[0] == "1.jpg 1 5"
    assert (tmp_path / "meta/ijbc_template_pair_label.txt").read_text().splitlines() == ["1 2 1", "1 3 0"]
    assert (tmp_path / "meta/ijbc_1N_gallery_G1.csv").read_text().splitlines() == [
        "TEMPLATE_ID,SUBJECT_ID,FILENAME",
        "1,40,a",
        "1,40,b",
    ]
    p = read_protocol(tmp_path)
    assert isinstance(p, Protocol) and p.root == tmp_path
    pd.testing.assert_frame_equal(p.images, frames["images"], check_dtype=False)
    assert (p.images["template"].dtype, p.pairs["t1"].dtype, p.gallery["subject"].dtype) == (np.int64,) * 3
    pd.testing.assert_frame_equal(p.pairs, frames["pairs"], check_dtype=False)
    pd.testing.assert_frame_equal(p.gallery, frames["gallery"], check_dtype=False)
    pd.testing.assert_frame_equal(p.probes, frames["probes"], check_dtype=False)


def test_optional_files(tmp_path: Path) -> None:
    frames = small_protocol()
    write_protocol(tmp_path, frames["images"])
    p = read_protocol(tmp_path)
    assert p.pairs.empty and p.gallery.empty and p.probes.empty and len(p.images) == 4
    (tmp_path / "meta/ijbc_1N_gallery_G1.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n1,40\n")
    with pytest.raises(DataError, match=r"ijbc_1N_gallery_G2\.csv.*ijbc_1N_probe_mixed\.csv: not found"):
        read_protocol(tmp_path)
    with pytest.raises(DataError, match=r"ijbb_face_tid_mid\.txt: image list not found"):
        read_protocol(tmp_path, name="ijbb")


FACE, PAIRS, G1, G2, PROBES = (
    "ijbc_face_tid_mid.txt",
    "ijbc_template_pair_label.txt",
    "ijbc_1N_gallery_G1.csv",
    "ijbc_1N_gallery_G2.csv",
    "ijbc_1N_probe_mixed.csv",
)


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        (FACE, "1.jpg 1 5\n2.jpg 1 6\n3.jpg 2\n", r", line 3: 2 fields, expected 3"),
        (FACE, "1.jpg 1 5\n2.jpg x 6\n", r", line 2: template 'x' is not an integer"),
        (FACE, "1.jpg 1 5\n\n2.jpg 1 6\n", r", line 2: blank line"),
        (PAIRS, "1 2 1\n1 2 1 0\n", r", line 2: 4 fields"),
        (PAIRS, "1 2 1\n1 3 2\n", r", line 2: label 2 is not 0 or 1"),
        (PAIRS, "1 2 1\n1 9 0\n", r", line 2: t2 9 has no image"),
        (G1, "TEMPLATE_ID,FILENAME\n1,a\n", r": header has no SUBJECT_ID column"),
        (G2, "TEMPLATE_ID,SUBJECT_ID\n2,41\n2,4x\n", r", line 3: SUBJECT_ID '4x' is not an integer"),
        (PROBES, "TEMPLATE_ID,SUBJECT_ID\n3,40,z\n", r", line 2: 3 fields"),
        (G2, "TEMPLATE_ID,SUBJECT_ID\n1,41\n", r".*: template 1 belongs to several subjects \[40, 41\]"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path: Path, file: str, text: str, message: str) -> None:
    write_protocol(tmp_path, **small_protocol())
    (tmp_path / "meta" / file).write_text(text)
    with pytest.raises(DataError, match=re.escape(file) + message):
        read_protocol(tmp_path)


# ------------------------------------------------------------------------------------------------ 1:1 verification


def circle(deg: np.ndarray) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_verify_separated_scores_give_tar_one_where_resolvable() -> None:
    # 20 subjects × 2 templates, one basis direction per subject: genuine 1, impostor 0
    ids = np.arange(40)
    feats = np.eye(20, dtype=np.float32)[ids // 2]
    t1, t2 = np.triu_indices(40, k=1)
    pairs = pd.DataFrame({"t1": t1, "t2": t2, "label": (t1 // 2 == t2 // 2).astype(int)})
    m = verify_templates((ids, feats), (ids, feats), pairs)
    assert (m["pairs"], m["genuine_pairs"], m["impostor_pairs"]) == (780, 20, 760)
    assert m["tar@far=1e-2"] == 1.0  # 760 impostors resolve 1e-2, not 1e-3
    assert all(math.isnan(m[k]) for k in ("tar@far=1e-3", "tar@far=1e-4", "tar@far=1e-5", "tar@far=1e-6"))


def test_verify_known_roc() -> None:
    genuine = [0.9, 0.7, 0.5, 0.3]
    impostor = [0.8, 0.45, 0.35, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0, -0.1]
    scores = np.array(genuine + impostor)
    # one query template [1, 0]; gallery template j at angle arccos(score_j): <query, gallery_j> = score_j
    query = (np.array([0]), circle(np.array([0.0])))
    gallery = (np.arange(1, 15), circle(np.rad2deg(np.arccos(scores))))
    pairs = pd.DataFrame({"t1": 0, "t2": np.arange(1, 15), "label": [1] * 4 + [0] * 10})
    m = verify_templates(query, gallery, pairs, fars=(0.05, 0.1, 0.2, 0.3))
    # FAR 0.1 lets one impostor (0.8) through: threshold above 0.45 keeps 0.9, 0.7, 0.5; FAR 0.3 keeps 0.3 too
    assert m["tar@far=1e-1"] == 0.75 and m["tar@far=2e-1"] == 0.75 and m["tar@far=3e-1"] == 1.0
    assert math.isnan(m["tar@far=5e-2"])  # 10 impostors cannot resolve 0.05
    # t1 is looked up on the query side and t2 on the gallery side only
    with pytest.raises(DataError, match=r"t2, gallery side: template 0 has no template feature"):
        verify_templates(query, gallery, pd.DataFrame({"t1": [0], "t2": [0], "label": [1]}))
    with pytest.raises(DataError, match=r"t1, query side: template 99 has no template feature"):
        verify_templates(query, gallery, pd.DataFrame({"t1": [99], "t2": [1], "label": [1]}))


# ---------------------------------------------------------------------------------------------- 1:N identification


def probe_rows(scores: list[list[float]]) -> np.ndarray:
    """Unit vectors in R^5 whose inner products with gallery basis vectors e1..e4 are the given scores."""
    s = np.array(scores, dtype=np.float64)
    return np.c_[s, np.sqrt(1 - (s**2).sum(axis=1))].astype(np.float32)


def test_identify_known_ranks_and_tpir() -> None:
    gallery = (np.array([10, 20, 30, 40]), np.eye(4, 5, dtype=np.float32))  # template 10·k = subject k, direction e_k
    gallery_subjects = pd.DataFrame({"template": [10, 20, 30, 40], "subject": [1, 2, 3, 4]})
    mated = [
        [0.6, 0.3, 0.2, 0.1],  # subject 1, rank 1, score 0.6
        [0.5, 0.4, 0.2, 0.1],  # subject 2, rank 2
        [0.1, 0.2, 0.5, 0.3],  # subject 3, rank 1, score 0.5
        [0.5, 0.4, 0.3, 0.2],  # subject 4, rank 4
        [0.35, 0.1, 0.2, 0.3],  # subject 1, rank 1, score 0.35
    ]
    top = [0.55, 0.45, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.02]
    nonmated = [np.roll([s, 0.0, 0.0, 0.0], i % 4).tolist() for i, s in enumerate(top)]
    probe_ids = np.arange(100, 115)
    probe = (probe_ids, probe_rows(mated + nonmated))
    probe_subjects = pd.DataFrame({"template": probe_ids, "subject": [1, 2, 3, 4, 1, *range(50, 60)]})
    fpirs, ranks = (0.01, 0.1, 0.3, 1.0), (1, 2, 5)
    m = identify_templates(gallery, gallery_subjects, probe, probe_subjects, fpirs=fpirs, ranks=ranks)
    assert (m["mated_probes"], m["nonmated_probes"]) == (5, 10)
    assert m["rank1"] == pytest.approx(3 / 5) and m["rank2"] == pytest.approx(4 / 5) and m["rank5"] == 1.0
    # FPIR 0.1: one non-mated alarm allowed, threshold above 0.45 -> probes scoring 0.6 and 0.5
    assert m["tpir@fpir=1e-1"] == pytest.approx(2 / 5)
    assert m["tpir@fpir=3e-1"] == pytest.approx(3 / 5)  # above 0.3: 0.35 counts too
    assert m["tpir@fpir=1e0"] == pytest.approx(m["rank1"])  # no threshold left: TPIR = rank-1 rate
    assert math.isnan(m["tpir@fpir=1e-2"])  # 10 non-mated probes cannot resolve 1%
    with pytest.raises(DataError, match=r"gallery side: template 50 has no template feature"):
        identify_templates(gallery, pd.DataFrame({"template": [50], "subject": [5]}), probe, probe_subjects)


# -------------------------------------------------------------------------------------------- whole protocol


def synthetic_protocol(root: Path, n_subjects: int = 30, d: int = 32) -> tuple[Protocol, np.ndarray]:
    """Each subject: 2 templates × 2 media × 2 images around a subject centre. G1/G2 hold the first template of
    half the subjects each, the probes are every second template; 1:1 pairs are all template pairs."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n_subjects, d))
    # (subject, template, media) per image
    rows = [(s, 2 * s + t, 4 * s + 2 * t + m) for s in range(n_subjects) for t in (0, 1) for m in (0, 1) for _ in "ab"]
    subject, template, media = (np.array(c) for c in zip(*rows, strict=True))
    x = (centres[subject] + 0.1 * rng.normal(size=(len(rows), d))).astype(np.float32)
    images = pd.DataFrame({"name": [f"{i}.jpg" for i in range(len(rows))], "template": template, "media": media})
    t1, t2 = np.triu_indices(2 * n_subjects, k=1)
    pairs = pd.DataFrame({"t1": t1, "t2": t2, "label": (t1 // 2 == t2 // 2).astype(int)})
    s = np.arange(n_subjects)
    gallery = pd.DataFrame({"template": 2 * s, "subject": s, "split": np.where(s < n_subjects // 2, "G1", "G2")})
    probes = pd.DataFrame({"template": 2 * s + 1, "subject": s})
    write_protocol(root, images, pairs, gallery, probes)
    return read_protocol(root), x


def test_evaluate_protocol_identity_and_rotation(tmp_path: Path) -> None:
    protocol, old = synthetic_protocol(tmp_path)
    same = evaluate_protocol(protocol, {"old": old, "new": old.copy()})
    assert list(same.index) == ["old/old", "new/old", "new/new"]
    assert same["query"].tolist() == ["old", "new", "new"] and same["gallery"].tolist() == ["old", "old", "new"]
    metrics = same.drop(columns=["query", "gallery"])
    assert {"tar@far=1e-2", "rank1", "rank5", "tpir@fpir=1e-1", "mated_probes"} <= set(metrics.columns)
    for pair in ("new/old", "new/new"):
        np.testing.assert_array_equal(metrics.loc[pair].to_numpy(float), metrics.loc["old/old"].to_numpy(float))
    oo = metrics.loc["old/old"]
    # G1 and G2 searched separately: each probe is mated in one and non-mated in the other
    assert (oo["mated_probes"], oo["nonmated_probes"], oo["impostor_pairs"]) == (30, 30, 1740)
    assert oo["rank1"] == 1.0 and oo["tar@far=1e-2"] == 1.0 and oo["tpir@fpir=1e-1"] == 1.0
    assert math.isnan(oo["tpir@fpir=1e-2"])  # 15 non-mated probes per gallery

    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(old.shape[1],) * 2))
    rotated = evaluate_protocol(protocol, {"old": old, "new": (old @ rotation).astype(np.float32)})
    r = rotated.drop(columns=["query", "gallery"])
    np.testing.assert_allclose(r.loc["new/new"].to_numpy(float), r.loc["old/old"].to_numpy(float), atol=1e-6)
    assert r.loc["new/old", "rank1"] <= 0.3 and r.loc["new/old", "tar@far=1e-2"] <= 0.3  # chance: 1/15, 0.01
    assert r.loc["new/old", "tpir@fpir=1e-1"] <= 0.3


def test_evaluate_protocol_bad_features(tmp_path: Path) -> None:
    protocol, old = synthetic_protocol(tmp_path, n_subjects=4)
    with pytest.raises(DataError, match=r"no features for model\(s\) \['new'\]"):
        evaluate_protocol(protocol, {"old": old})
    with pytest.raises(DataError, match=r"features\['new'\]: 31 feature rows for 32 template ids"):
        evaluate_protocol(protocol, {"old": old, "new": old[:-1]})
    bad = old.copy()
    bad[5, 0] = np.nan
    with pytest.raises(DataError, match=r"features\['new'\]: NaN or inf in row 5"):
        evaluate_protocol(protocol, {"old": old, "new": bad})
