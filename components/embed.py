"""Saving, loading, exporting and running embedding models (torch checkpoints and ONNX).

Every model here maps float32 [n, 1, H, W] in [-1, 1] to raw embeddings [n, d]. A checkpoint holds only the
backbone (never a classifier, never an old-model weight) plus what is needed to rebuild it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from components.errors import DataError, IncompatibleModel
from components.io import atomic_path
from components.models import build_backbone
from components.train import to_input


class Embedder(Protocol):
    dim: int
    image_size: int
    source: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...  # float32 [n, 1, H, W] -> [n, d]


def save_backbone(backbone: nn.Module, path: Path, arch: str, embedding_dim: int, image_size: int) -> Path:
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    payload = {"arch": arch, "embedding_dim": embedding_dim, "image_size": image_size, "state_dict": state}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return path


def load_backbone(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild a frozen backbone in eval mode from a checkpoint written by `save_backbone`."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = {k: payload[k] for k in ("arch", "embedding_dim", "image_size")}
    except (OSError, RuntimeError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a backbone checkpoint written by this project ({err})") from err
    model = build_backbone(meta["arch"], int(meta["embedding_dim"]), int(meta["image_size"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta


class TorchEmbedder:
    def __init__(self, path: Path) -> None:
        self.model, meta = load_backbone(path)
        self.dim, self.image_size, self.source = int(meta["embedding_dim"]), int(meta["image_size"]), str(path)

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(x)).numpy()


class OnnxEmbedder:
    def __init__(self, path: Path, threads: int = 2) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise DataError(f"{path}: cannot load ONNX model ({err})") from err
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name = inp.name
        shape, out_shape = inp.shape, out.shape
        if len(shape) != 4 or shape[1] != 1 or len(out_shape) != 2 or not isinstance(out_shape[1], int):
            raise DataError(
                f"{path}: expected input [n, 1, H, W] and output [n, d], got input {shape}, output {out_shape}"
            )
        self.image_size = int(shape[2]) if isinstance(shape[2], int) else -1
        self.dim, self.source = int(out_shape[1]), str(path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def load_embedder(path: str | os.PathLike[str], threads: int = 2) -> Embedder:
    """An old or new model, from a .pt checkpoint or an .onnx file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    if path.suffix == ".onnx":
        return OnnxEmbedder(path, threads=threads)
    if path.suffix == ".pt":
        return TorchEmbedder(path)
    raise DataError(f"{path}: unknown model format (expected .onnx or .pt)")


def check_compatible_dims(old: Embedder, new_dim: int, image_size: int, name: str | None = None) -> None:
    """Refuse an old model whose embedding size or input size cannot pair with the new model."""
    name = name or old.source
    if old.dim != new_dim:
        raise IncompatibleModel(
            f"{name}: old model outputs {old.dim}-d embeddings but train.embedding_dim is {new_dim}; "
            "MixBCT replaces rows, so both must be equal"
        )
    if old.image_size not in (-1, image_size):
        raise IncompatibleModel(
            f"{name}: old model expects {old.image_size}px inputs but data.image_size is {image_size}"
        )


def extract(
    embedder: Embedder,
    images: np.ndarray,  # [N, H, W] uint8
    batch_size: int = 512,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embeddings [N, d] float32, in input order."""
    out = np.empty((len(images), embedder.dim), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        out[start : start + len(chunk)] = embedder(to_input(chunk).numpy())
        if progress is not None:
            progress(len(chunk))
    return out


def export_onnx(backbone: nn.Module, path: Path, image_size: int) -> Path:
    """Export with a dynamic batch dimension, weights inside the one .onnx file."""
    backbone = backbone.eval()
    example = torch.zeros(2, 1, image_size, image_size)
    with atomic_path(path, suffix=".onnx") as tmp:
        torch.onnx.export(
            backbone,
            (example,),
            str(tmp),
            input_names=["x"],
            output_names=["embedding"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    return path


def onnx_parity(backbone: nn.Module, onnx_path: Path, images: np.ndarray, threads: int = 2) -> float:
    """Max |torch − onnxruntime| over the embeddings of `images` [n, H, W] uint8."""
    x = to_input(torch.from_numpy(np.ascontiguousarray(images))).numpy()
    with torch.inference_mode():
        ref = backbone.eval()(torch.from_numpy(x)).numpy()
    got = OnnxEmbedder(onnx_path, threads=threads)(x)
    return float(np.max(np.abs(ref - got)))
