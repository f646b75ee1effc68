"""A user's gallery embeddings file: keyed rows (.npz) put into gallery-manifest order, or refused clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.errors import DataError
from components.stages import _load_gallery_file


def _gallery_rows(root: Path) -> pd.DataFrame:
    sources = [str(root / f"id{i}" / f"{j}.png") for i in range(4) for j in range(2)]
    return pd.DataFrame({"id": [f"gallery:{Path(s).parent.name}:{Path(s).name}:0" for s in sources], "source": sources})


def test_npz_rows_are_picked_by_path_into_manifest_order(tmp_path: Path) -> None:
    rows = _gallery_rows(tmp_path / "faces")
    emb = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)  # 8 gallery images + 2 the test gallery lacks
    names = [f"id{i}/{j}.png" for i in range(4) for j in range(2)] + ["id9/0.png", "id9/1.png"]
    perm = np.random.default_rng(0).permutation(10)
    np.savez(tmp_path / "g.npz", embeddings=emb[perm], paths=np.array(["/elsewhere/" + names[k] for k in perm]))
    gallery, info = _load_gallery_file(tmp_path / "g.npz", rows)
    np.testing.assert_array_equal(gallery, emb[:8])  # row k of the manifest gets the embedding written for it
    assert info == {"gallery_key": "paths", "gallery_rows_unused": 2}


def test_npz_rows_keyed_by_manifest_ids(tmp_path: Path) -> None:
    rows = _gallery_rows(tmp_path)
    emb = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    np.savez(tmp_path / "g.npz", embeddings=emb[::-1], ids=np.array(list(rows["id"])[::-1]))
    gallery, _ = _load_gallery_file(tmp_path / "g.npz", rows)
    np.testing.assert_array_equal(gallery, emb)


def test_npy_is_taken_as_manifest_order(tmp_path: Path) -> None:
    emb = np.ones((8, 3), dtype=np.float64)
    np.save(tmp_path / "g.npy", emb)
    gallery, info = _load_gallery_file(tmp_path / "g.npy", _gallery_rows(tmp_path))
    assert gallery.dtype == np.float32 and gallery.shape == (8, 3) and info == {}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"embeddings": np.zeros((7, 3)), "paths": np.array([f"id{i}/{j}.png" for i in range(4) for j in range(2)][:7])},
         r"no embedding for 1 of the 8 gallery images \(by `paths`\), e\.g\. id3/1\.png"),
        ({"embeddings": np.zeros((9, 3)), "paths": np.array([f"id{i}/{j}.png" for i in range(4) for j in range(2)] + ["id0/0.png"])},
         r"`paths` names 'id0/0\.png' twice"),
        ({"embeddings": np.zeros((8, 3))}, r"needs `embeddings` and `paths` or `ids`"),
        ({"embeddings": np.zeros((8, 3)), "paths": np.array(["a"] * 3)}, r"one row per name"),
        ({"embeddings": np.zeros((2, 3)), "paths": np.array(["a", "b"], dtype=object)}, r"must be a string array"),
    ],
)  # fmt: skip
def test_bad_npz_gallery_names_the_file_and_what_is_wrong(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=rf"bad\.npz: .*{message}"):
        _load_gallery_file(tmp_path / "bad.npz", _gallery_rows(tmp_path))


def test_parquet_rows_keyed_by_ids_or_paths(tmp_path: Path) -> None:
    """A Parquet table (what a feature store exports): `embeddings` a list per row, `ids` or `paths`."""
    rows = _gallery_rows(tmp_path / "faces")
    emb = np.random.default_rng(1).standard_normal((8, 3)).astype(np.float32)
    perm = np.random.default_rng(2).permutation(8)
    pd.DataFrame({"ids": list(rows["id"].to_numpy()[perm]), "embeddings": list(emb[perm])}).to_parquet(tmp_path / "g.parquet")
    gallery, info = _load_gallery_file(tmp_path / "g.parquet", rows)
    np.testing.assert_array_equal(gallery, emb)
    assert info == {"gallery_key": "ids", "gallery_rows_unused": 0}
    names = [f"id{i}/{j}.png" for i in range(4) for j in range(2)]
    pd.DataFrame({"paths": names, "embeddings": list(emb)}).to_parquet(tmp_path / "p.parquet")
    np.testing.assert_array_equal(_load_gallery_file(tmp_path / "p.parquet", rows)[0], emb)
    pd.DataFrame({"name": names, "embeddings": list(emb)}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: a Parquet gallery needs columns `embeddings` and `ids` or `paths`"):
        _load_gallery_file(tmp_path / "bad.parquet", rows)
    ragged = pd.DataFrame({"ids": list(rows["id"])[:2], "embeddings": [[1.0, 2.0], [1.0]]})
    ragged.to_parquet(tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match=r"ragged\.parquet: column `embeddings` must hold one list"):
        _load_gallery_file(tmp_path / "ragged.parquet", rows)
