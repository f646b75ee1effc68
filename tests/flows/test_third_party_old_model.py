"""A real third-party old model nobody here trained: the PP-OCRv4 text recogniser ONNX that the PyPI package
`rapidocr-onnxruntime` ships. It reads CJK characters, so on the embedded glyphs it is a plausible old embedder:
its embedding is the recogniser's sequence features (tensor `transpose_51.tmp_0`, [n, T, 120]) averaged over the
sequence (old.output, old.pool), its input 48-pixel-high BGR scaled to [-1, 1] (old.preprocess).

The user's gallery is computed here the way RapidOCR itself feeds the model (its own resize_norm_img, cv2 BGR),
independently of the pipeline's Preprocess; the upgrade must then agree with it: the legacy stage imports the
gallery, the extract stage re-embeds images with the pipeline's preprocessing, and both must match."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import yaml

from components.paths import Paths

TENSOR, POOL, DIM = "transpose_51.tmp_0", "mean_seq", 120
PREPROCESS = {"size": [48, 48], "channels": 3, "order": "bgr", "mean": [127.5], "std": [127.5]}


def _recogniser() -> Path:
    try:
        dist = importlib.metadata.distribution("rapidocr-onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("rapidocr-onnxruntime is not installed (requirements.lock): `make setup`")
    return Path(str(dist.locate_file("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")))


def _rapidocr_embeddings(model: Path, gray: np.ndarray) -> np.ndarray:
    """RapidOCR's own input path (cv2 BGR, TextRecognizer.resize_norm_img) and the named tensor, mean over T."""
    import cv2
    import onnxruntime as ort
    from rapidocr_onnxruntime.ch_ppocr_rec.text_recognize import TextRecognizer

    graph = onnx.load(str(model))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(TENSOR, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    session = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    shape = SimpleNamespace(rec_image_shape=[3, 48, 320])
    batch = np.stack([TextRecognizer.resize_norm_img(shape, cv2.cvtColor(g, cv2.COLOR_GRAY2BGR), 1.0) for g in gray])
    feats = session.run([TENSOR], {session.get_inputs()[0].name: batch})[0]  # [n, T, 120]
    return feats.mean(axis=1).astype(np.float32)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_upgrade_from_a_pretrained_ocr_recogniser(tmp_path: Path, kanjivg_raw: Path) -> None:
    from components import pipeline
    from components.config import load_config
    from components.stages import old_embedder, split_arrays
    from flows.upgrade import upgrade

    model = shutil.copy(_recogniser(), tmp_path / "ppocr_rec.onnx")
    data = {"root": str(kanjivg_raw), "image_size": 48, "train_identities": 240, "test_identities": 40, "val_identities": 4,
            "samples_per_identity": 6, "shift": "none"}  # fmt: skip
    params = {
        "data": data,
        "train": {"embedding_dim": DIM, "epochs": 2, "batch_size": 64, "paragon": False},
        "evaluate": {"bootstrap_resamples": 100},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_root": str(tmp_path / "art")},
    }
    # The user's gallery: the test identities' gallery renderings, embedded by RapidOCR's own code, keyed by id.
    scratch = Paths(tmp_path / "scratch")
    pipeline.run("prepare", load_config(None, {f"data.{k}": v for k, v in data.items()}), scratch)
    manifest = __import__("pandas").read_csv(scratch.manifest)
    gallery_images, _ = split_arrays(scratch, "gallery")
    ids = manifest.loc[manifest["split"] == "gallery", "id"].to_numpy()
    embeddings = _rapidocr_embeddings(model, np.asarray(gallery_images))
    np.savez(tmp_path / "gallery.npz", embeddings=embeddings, ids=ids.astype(str))

    params["old"] = {"model": str(model), "gallery": str(tmp_path / "gallery.npz"), "preprocess": PREPROCESS,
                     "output": TENSOR, "pool": POOL}  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    work = Paths(tmp_path / "work")
    result = upgrade(params=str(tmp_path / "params.yaml"), workdir=str(work.root))
    assert result["status"] == "done"

    info = json.loads((work.legacy / "info.json").read_text())
    assert info["origin"] == "imported" and info["feed"]["output"] == TENSOR and info["feed"]["pool"] == POOL
    # gallery (RapidOCR's preprocessing) == the pipeline's extraction through old.preprocess / output / pool
    old = old_embedder(work)
    assert old.dim == DIM and old.preprocess.order == "bgr"
    images, _ = split_arrays(work, "gallery")
    from components.embed import extract

    ours = extract(old, images)
    np.testing.assert_allclose(ours, np.load(work.legacy / "gallery.npy"), atol=2e-4)
    np.testing.assert_allclose(ours, embeddings, atol=2e-4)  # and the stored rows are the user's, in manifest order
    train_images, _ = split_arrays(work, "new_train")
    features = np.load(work.old_features / "features.npy")
    rows = np.array([0, len(features) // 2, len(features) - 1])
    np.testing.assert_allclose(features[rows], _rapidocr_embeddings(model, np.asarray(train_images[rows])), atol=2e-4)

    metrics = json.loads((work.eval / "metrics.json").read_text())
    assert metrics["pairs"]["old/old"]["top1"] > 0.2  # a real recogniser separates glyphs it never trained on
    assert result["register"]["registered"] == metrics["criterion"]["passed"]
