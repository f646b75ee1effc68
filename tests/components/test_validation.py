"""Great Expectations suites: a good manifest / embedding matrix passes, each corruption is named."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.errors import ValidationFailed
from components.validation import ValidationReport, _report, validate_embeddings, validate_manifest
from markdown_cells import content

Corruption = Callable[[pd.DataFrame, Path], tuple[pd.DataFrame, str]]  # (manifest, tmp) -> (bad one, culprit)
NUM_CLASSES = {"old_train": 2, "new_train": 3, "test": 2, "val": 2}
# identity -> (split, label, number of images); ImageFolder style: one file per row, sample 0
LAYOUT = [
    ("a0", "old_train", 0, 2),
    ("a1", "old_train", 1, 3),
    ("a1", "new_train", 0, 2),  # old identities may come back in the new training set
    ("b0", "new_train", 1, 2),
    ("b1", "new_train", 2, 2),
    ("t0", "gallery", 0, 1),
    ("t0", "query", 0, 2),
    ("t1", "gallery", 1, 1),
    ("t1", "query", 1, 1),
    ("t0", "shift_gallery", 0, 1),  # the shifted set shares the test labels
    ("t0", "shift_query", 0, 1),
    ("v0", "val_gallery", 0, 1),  # validation identities: their own labels
    ("v0", "val_query", 0, 2),
    ("v1", "val_gallery", 1, 1),
    ("v1", "val_query", 1, 1),
]


def _decode(path: Path) -> None:
    with Image.open(path) as image:
        image.load()


def _png(path: Path, value: int) -> str:
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def manifest(tmp_path: Path) -> pd.DataFrame:
    rows = []
    for identity, split, label, n in LAYOUT:
        for k in range(n):
            source = _png(tmp_path / f"{identity}_{split}_{k}.png", 10 * len(rows))
            rows.append((f"{split}:{identity}:{k}", source, 0, identity, split, label))
    return pd.DataFrame(rows, columns=["id", "source", "sample", "identity", "split", "label"])


def _failures(report: ValidationReport, description: str) -> str:
    """The failure lines of one expectation (by its description); fails the test if there is none."""
    assert not report.success
    lines = [line for line in report.failures if description in line]
    assert lines, f"no failure about {description!r} in {report.failures}"
    return "\n".join(lines)


def _row(manifest: pd.DataFrame, split: str, identity: str) -> int:
    return int(manifest.index[(manifest["split"] == split) & (manifest["identity"] == identity)][0])


# ------------------------------------------------------------------------------------------------ manifest


def test_good_manifest_passes_and_writes_report(manifest: pd.DataFrame, tmp_path: Path) -> None:
    report_path = tmp_path / "reports" / "data_validation.md"
    report = validate_manifest(manifest, NUM_CLASSES, _decode, "toy-root", report_path=report_path)
    assert report.success, report.failures
    assert report.failures == []
    assert report.name == "manifest"
    text = report_path.read_text()
    assert text == report.markdown
    assert "**FAIL**" not in text and "PASSED" in text and "toy-root" in text
    for expectation in ("every raw file decodes", "splits are disjoint", "sample ids are unique"):
        assert expectation in text
    report.raise_for_failure()  # no-op on success


def test_decode_is_called_once_per_unique_source(manifest: pd.DataFrame, tmp_path: Path) -> None:
    kanji = manifest.copy()  # KanjiVG style: many renderings (sample) of one raw file per identity
    kanji["source"] = kanji.groupby("identity")["source"].transform("first")
    kanji["sample"] = kanji.groupby("source").cumcount()
    seen: list[Path] = []
    report = validate_manifest(kanji, NUM_CLASSES, seen.append, "toy")
    assert report.success, report.failures
    assert sorted(seen) == sorted(Path(s) for s in kanji["source"].unique())


def _missing_file(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    m.loc[_row(m, "new_train", "b0"), "source"] = str(tmp / "gone.png")
    return m, "gone.png"


def _undecodable(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    Path(m.loc[_row(m, "query", "t1"), "source"]).write_bytes(b"not a png")
    return m, "t1_query_0.png"


def _label_out_of_range(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    i = _row(m, "new_train", "b1")
    m.loc[i, "label"] = 3  # new_train has 3 classes: 0..2
    return m, m.loc[i, "id"]


def _singleton_class(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    return m.drop(index=_row(m, "old_train", "a0")), "identity=a0"  # a0 keeps 1 sample


def _rendering_in_two_splits(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    row = m.loc[_row(m, "query", "t0")].copy()
    row["id"], row["split"] = "gallery:t0:extra", "gallery"
    m.loc[len(m) + 100] = row
    return m, Path(row["source"]).name


def _test_identity_in_new_train(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    m.loc[len(m) + 100] = ["new_train:t0:0", _png(tmp / "t0_new.png", 7), 0, "t0", "new_train", 1]
    return m, "t0"


def _duplicate_id(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    m.loc[_row(m, "new_train", "b1"), "id"] = "old_train:a1:0"
    return m, "old_train:a1:0"


def _unknown_split(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    m.loc[_row(m, "new_train", "b1"), "split"] = "validation"
    return m, "split=validation"


def _no_query_for_test_identity(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    m = m.drop(index=_row(m, "query", "t1"))
    m.loc[len(m) + 100] = ["gallery:t1:9", _png(tmp / "t1_extra.png", 9), 0, "t1", "gallery", 1]  # t1 keeps 2 rows
    return m, "identity=t1"


def _validation_identity_in_test(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    m.loc[m["identity"] == "v1", "identity"] = "t1"
    return m, "identity=t1"


def _validation_identity_without_gallery(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    m = m.drop(index=_row(m, "val_gallery", "v1"))
    m.loc[len(m) + 100] = ["val_query:v1:9", _png(tmp / "v1_extra.png", 9), 0, "v1", "val_query", 1]
    return m, "identity=v1"


def _null_identity(m: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    i = _row(m, "old_train", "a1")
    m.loc[i, "identity"] = None
    return m, m.loc[i, "id"]


CORRUPTIONS: list[tuple[Corruption, str]] = [
    (_missing_file, "every raw file exists"),
    (_undecodable, "every raw file decodes"),
    (_label_out_of_range, "new_train labels in [0, 3)"),
    (_singleton_class, "every class has >= 2 samples"),
    (_rendering_in_two_splits, "splits are disjoint"),
    (_test_identity_in_new_train, "test and validation identities never appear in old_train or new_train"),
    (_duplicate_id, "sample ids are unique"),
    (_unknown_split, "split is a known split"),
    (_no_query_for_test_identity, "every test and validation identity has >= 1 query sample"),
    (_null_identity, "no null identity"),
    (_validation_identity_in_test, "validation identities never appear in the test set"),
    (_validation_identity_without_gallery, "every test and validation identity has >= 1 gallery sample"),
]


@pytest.mark.parametrize(("corrupt", "expectation"), CORRUPTIONS, ids=[c.__name__[1:] for c, _ in CORRUPTIONS])
def test_each_manifest_corruption_is_rejected_and_named(
    manifest: pd.DataFrame, tmp_path: Path, corrupt: Corruption, expectation: str
) -> None:
    manifest, culprit = corrupt(manifest.copy(), tmp_path)
    report = validate_manifest(manifest, NUM_CLASSES, _decode, "toy-root")
    line = _failures(report, expectation)
    assert culprit in line
    assert "manifest [toy-root]" in line
    assert "**FAIL**" in report.markdown


def test_undecodable_file_reports_the_decoder_error(manifest: pd.DataFrame, tmp_path: Path) -> None:
    manifest, _ = _undecodable(manifest, tmp_path)
    report = validate_manifest(manifest, NUM_CLASSES, _decode, "toy")
    assert "UnidentifiedImageError" in _failures(report, "every raw file decodes")
    assert not any("every raw file exists" in line for line in report.failures)  # it exists, it just does not decode


def test_empty_old_group_is_allowed_but_rows_without_classes_are_not(manifest: pd.DataFrame) -> None:
    no_old = manifest[manifest["split"] != "old_train"].reset_index(drop=True)
    report = validate_manifest(no_old, {**NUM_CLASSES, "old_train": 0}, _decode, "toy")
    assert report.success, report.failures
    report = validate_manifest(manifest, {**NUM_CLASSES, "old_train": 0}, _decode, "toy")
    assert "old_train:a0:0" in _failures(report, "old_train has 0 classes")


def test_shared_training_renderings_need_the_extended_flag(manifest: pd.DataFrame) -> None:
    extended = manifest.copy()
    old_a1 = extended[(extended["split"] == "old_train") & (extended["identity"] == "a1")].head(2)
    extended.loc[extended.index[(extended["split"] == "new_train") & (extended["identity"] == "a1")], "source"] = (
        old_a1["source"].to_numpy()
    )
    assert validate_manifest(extended, NUM_CLASSES, _decode, "toy", shared_train_samples=True).success
    _failures(validate_manifest(extended, NUM_CLASSES, _decode, "toy"), "splits are disjoint")


def test_missing_column_gives_a_failed_report_not_an_exception(manifest: pd.DataFrame) -> None:
    report = validate_manifest(manifest.drop(columns=["label"]), NUM_CLASSES, _decode, "toy")
    _failures(report, "column 'label' exists")


# ------------------------------------------------------------------------------------------------ embeddings


@pytest.fixture
def gallery() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)  # [n, d]


def test_good_embeddings_pass(gallery: np.ndarray, tmp_path: Path) -> None:
    report = validate_embeddings(gallery, 16, 50, "gallery.npy", suite="legacy_gallery", report_path=tmp_path / "r.md")
    assert report.success, report.failures
    assert report.name == "legacy_gallery"
    assert (tmp_path / "r.md").read_text() == report.markdown
    assert "shape (50, 16)" in report.markdown


def test_nan_gallery_is_rejected_naming_the_row(gallery: np.ndarray) -> None:
    gallery[17, 3] = np.nan
    gallery[23, 0] = np.inf
    report = validate_embeddings(gallery, 16, 50, "old/gallery.npy", suite="legacy_gallery")
    line = _failures(report, "no NaN or inf values")
    assert "row=17" in line and "row=23" in line and "old/gallery.npy" in line
    assert len(report.failures) == 1  # the NaN rows do not also fail the norm expectation


@pytest.mark.parametrize(
    ("mangle", "expected_dim", "expected_rows", "expectation", "culprit"),
    [
        (lambda g: g, 32, 50, "every embedding has 32 values", "dim=16"),
        (lambda g: g[:40], 16, 50, "50 rows", "observed 40"),
        (lambda g: g[:, 0], 16, 50, "a 2-D matrix", "ndim=1"),
        (lambda g: g.reshape(50, 4, 4), 16, 50, "a 2-D matrix", "ndim=3"),
        (lambda g: np.concatenate([g[:9], np.zeros((1, 16), g.dtype), g[10:]]), 16, 50, "L2 norm in", "row=9"),
        (lambda g: g * 1e6, 16, 50, "L2 norm in", "row=0"),
    ],
    ids=["wrong-dim", "wrong-rows", "1-D", "3-D", "zero-norm", "huge-norm"],
)
def test_bad_embeddings_are_rejected(
    gallery: np.ndarray,
    mangle: Callable[[np.ndarray], np.ndarray],
    expected_dim: int,
    expected_rows: int,
    expectation: str,
    culprit: str,
) -> None:
    report = validate_embeddings(mangle(gallery), expected_dim, expected_rows, "new/gallery.npy")
    line = _failures(report, expectation)
    assert culprit in line and "new/gallery.npy" in line


# ------------------------------------------------------------------------------------------------ raising


def test_raise_for_failure_names_suite_source_expectation_and_report(gallery: np.ndarray, tmp_path: Path) -> None:
    gallery[5] = np.nan
    path = tmp_path / "legacy_gallery_validation.md"
    report = validate_embeddings(gallery, 16, 50, "old/gallery.npy", suite="legacy_gallery", report_path=path)
    with pytest.raises(ValidationFailed) as info:
        report.raise_for_failure(path)
    message = str(info.value)
    assert "'legacy_gallery'" in message and "old/gallery.npy" in message
    assert "no NaN or inf values" in message and "row=5" in message
    assert str(path) in message and info.value.report == str(path)


def test_importing_the_module_does_not_import_great_expectations() -> None:
    code = "import sys, components.validation; assert 'great_expectations' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# The report as the string-building renderer wrote it before DataFrame.to_markdown: same lines, cells (a `|` in a
# cell escaped, a newline folded) and column alignment; tabulate pads the cells, which `content` ignores.
REPORT_MD_BEFORE = """\
# Validation report: manifest

- source: `toy-root`
- result: **FAILED** (1 of 3 expectations met)
- rows: 10

| # | status | expectation | description | column | check | observed |
|---|---|---|---|---|---|---|
| 1 | pass | expect_table_row_count_to_equal | row count |  | value=50 | observed 50 |
| 2 | **FAIL** | expect_column_values_to_match_regex | names are clean | name | regex="^[a-z]+$" | 1 of 10 rows unexpected, e.g. a\\|b |
| 3 | **FAIL** | expect_column_to_exist |  | label |  | error: boom |

## Failures

- manifest [toy-root]: names are
clean (expect_column_values_to_match_regex on name): 1 of 10 rows unexpected, e.g. a|b
- manifest [toy-root]: None (expect_column_to_exist on label): error: boom
"""


def test_report_markdown_content_is_what_the_string_building_renderer_wrote() -> None:
    from types import SimpleNamespace as NS

    def config(type_: str, description: str | None, **kwargs: object) -> NS:
        return NS(type=type_, description=description, kwargs=kwargs, meta={})

    results = [
        NS(success=True, result={"observed_value": 50.0}, exception_info={},
           expectation_config=config("expect_table_row_count_to_equal", "row count", value=50)),
        NS(success=False, result={"unexpected_count": 1, "element_count": 10, "missing_count": 0,
                                  "partial_unexpected_list": ["a|b"]}, exception_info={},
           expectation_config=config("expect_column_values_to_match_regex", "names are\nclean", column="name",
                                     regex="^[a-z]+$")),
        NS(success=False, result={}, exception_info={"raised_exception": True, "exception_message": "boom"},
           expectation_config=config("expect_column_to_exist", None, column="label")),
    ]  # fmt: skip
    markdown = _report("manifest", "toy-root", ["rows: 10"], results, {}, None).markdown
    assert content(markdown) == content(REPORT_MD_BEFORE)
    assert "| 1   | pass     |" in markdown  # tabulate pads the cells
