"""RecordIO and WebDataset sets as data.source: listed from their index (never decoded to list them), split like
any identity set, validated, and read per batch either decoded from the raw files (data.store: source) or from
the images.npy the prepare stage wrote (array); both give the same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components import stages
from components.config import DataConfig
from components.data.manifest import build_manifest
from components.data.recordio import RecordIOReader, decode_image_bytes
from components.data.store import ImageRows, SourceRows
from components.errors import ValidationFailed
from components.paths import Paths
from tests.face_kit import faces, glyph_files, write_recordio_set, write_webdataset

IDENTITIES, PER_IDENTITY, SIZE = 24, 6, 32


@pytest.fixture(scope="module")
def images(kanjivg_raw: Path) -> dict[int, np.ndarray]:
    files = glyph_files(kanjivg_raw, IDENTITIES)
    return {100 + k: faces(f, 100 + k, PER_IDENTITY, SIZE) for k, f in enumerate(files)}


def _cfg(source: str, root: Path, **kw: object) -> DataConfig:
    return DataConfig(source=source, root=str(root), image_size=SIZE, channels=3, test_identities=6, val_identities=2,
                      **kw)  # type: ignore[arg-type]  # fmt: skip


def test_the_split_does_not_depend_on_where_the_files_are(images: dict, tmp_path: Path) -> None:
    a = build_manifest(_cfg("recordio", write_recordio_set(tmp_path / "a", images).parent))
    b = build_manifest(_cfg("recordio", write_recordio_set(tmp_path / "elsewhere" / "b", images).parent))
    assert a[["sample", "identity", "split", "label"]].equals(b[["sample", "identity", "split", "label"]])


@pytest.mark.parametrize("source", ["recordio", "webdataset"])
def test_listed_from_the_index_and_split_by_identity(source: str, images: dict, tmp_path: Path) -> None:
    root = write_recordio_set(tmp_path / "rec", images) if source == "recordio" else tmp_path / "wds"
    if source == "webdataset":
        write_webdataset(root, images)
    manifest = build_manifest(_cfg(source, root))
    assert len(manifest) == IDENTITIES * PER_IDENTITY or set(manifest["split"]) >= {"gallery", "query"}
    assert sorted(manifest["identity"].unique().astype(int)) == sorted(images)  # identities are the labels
    test = set(manifest.loc[manifest["split"].isin(["gallery", "query"]), "identity"])
    train = set(manifest.loc[manifest["split"].isin(["old_train", "new_train"]), "identity"])
    assert len(test) == 6 and not test & train


@pytest.mark.parametrize("store", ["source", "array"])
def test_prepare_then_read_gives_the_records_pixels(store: str, images: dict, tmp_path: Path) -> None:
    rec = write_recordio_set(tmp_path / "rec", images)
    cfg = _cfg("recordio", rec.parent, store=store)
    paths = Paths(tmp_path / "work")
    stages.prepare(cfg, paths, workers=1)
    view = stages.load_images(paths)
    assert isinstance(view, SourceRows if store == "source" else ImageRows)
    assert (paths.images.is_file()) == (store == "array")  # a source store copies no pixel
    manifest = stages.load_manifest(paths)
    reader = RecordIOReader(rec)
    for row in (0, 7, len(manifest) - 1):
        _, payload = reader.read(int(manifest["sample"][row]))
        want = decode_image_bytes(payload, "x", channels=3, size=SIZE)
        assert np.array_equal(view[row], want)
    query, labels = stages.split_arrays(paths, "query")
    assert query.shape == (len(labels), SIZE, SIZE, 3)


def test_a_broken_record_fails_validation_naming_it(images: dict, tmp_path: Path) -> None:
    rec = write_recordio_set(tmp_path / "rec", images)
    reader = RecordIOReader(rec)
    manifest = build_manifest(_cfg("recordio", rec.parent))
    key = int(manifest.loc[manifest["split"] == "query", "sample"].iloc[0])  # a record the split uses
    data = bytearray(rec.read_bytes())
    offset = reader.offset(key) + 8 + 24  # the image payload, after the container and IRHeader
    data[offset + 2 : offset + 40] = b"\0" * 38  # JPEG markers gone
    rec.write_bytes(bytes(data))
    cfg = _cfg("recordio", rec.parent, store="array")
    with pytest.raises(ValidationFailed) as info:
        stages.prepare(cfg, Paths(tmp_path / "work"), workers=1)
    assert f"train.rec (key {key}): cannot decode image" in str(info.value)
    assert not (tmp_path / "work" / "dataset").exists()  # nothing half-written
