"""Saving, loading, exporting and running embedding models (torch checkpoints and ONNX).

Every model here maps float32 [n, 1, H, W] in [-1, 1] to raw embeddings [n, d]. A backbone checkpoint
(`save_backbone`) holds only the backbone (never a classifier, never an old-model weight) plus what is needed to
rebuild it. A training-free composite (`components.training_free`, saved by `save_composite`) holds its parts and
its fitted map; a SLERP composite holds the old model too, by design: it runs both models per query.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from components.errors import DataError, IncompatibleModel, UpgradeError
from components.io import atomic_path, file_sha256
from components.models import build_backbone
from components.preprocess import to_input

if TYPE_CHECKING:
    import onnx

    from components.training_free import TrainingFreeEmbedder


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


def _composite_meta(method: str, parts: Mapping[str, Mapping[str, Any]], maps: Mapping[str, Any]) -> dict[str, Any]:
    """What a composite checkpoint describes: {"arch": method, "embedding_dim", "image_size", "parts": {role: meta}}.

    ValueError unless the parts and map tensors fit `method` (components.training_free.COMPOSITE_PARTS / _MAPS):
    R is [d_new, d_out] with d_new the new part's embedding_dim (and d_out the old part's, for SLERP), b is [d_out],
    and every part takes the same image size.
    """
    from components.training_free import COMPOSITE_MAPS, COMPOSITE_PARTS

    if sorted(parts) != sorted(COMPOSITE_PARTS[method]):
        raise ValueError(f"{method} needs parts {list(COMPOSITE_PARTS[method])}, got {sorted(parts)}")
    if sorted(maps) != sorted(COMPOSITE_MAPS[method]):
        raise ValueError(f"{method} needs map tensors {list(COMPOSITE_MAPS[method])}, got {sorted(maps)}")
    if not all(isinstance(t, torch.Tensor) for t in maps.values()):
        raise ValueError("its map entries must be tensors")
    metas = {
        role: {"arch": str(m["arch"]), "embedding_dim": int(m["embedding_dim"]), "image_size": int(m["image_size"])}
        for role, m in parts.items()
    }
    r = maps["R"]
    if r.ndim != 2 or r.shape[0] != metas["new"]["embedding_dim"]:
        raise ValueError(f"map R has shape {tuple(r.shape)}; the new part outputs {metas['new']['embedding_dim']}-d")
    if "old" in metas and r.shape[1] != metas["old"]["embedding_dim"]:
        raise ValueError(f"map R has shape {tuple(r.shape)}; the old part outputs {metas['old']['embedding_dim']}-d")
    if "b" in maps and tuple(maps["b"].shape) != (r.shape[1],):
        raise ValueError(f"map b has shape {tuple(maps['b'].shape)}, R has {r.shape[1]} columns")
    sizes = sorted({m["image_size"] for m in metas.values()})
    if len(sizes) != 1:
        raise ValueError(f"its parts take different image sizes {sizes}")
    return {"arch": method, "embedding_dim": int(r.shape[1]), "image_size": sizes[0], "parts": metas}


def save_composite(model: TrainingFreeEmbedder, path: Path, parts: Mapping[str, Mapping[str, Any]]) -> Path:
    """Save a training-free composite; `load_backbone` rebuilds it (frozen, eval mode).

    `parts` gives each backbone role of `model` ("new"; SLERP also "old") its {"arch", "embedding_dim",
    "image_size"}, e.g. the meta `load_backbone` returned for it. Payload (tensors, str, int and float only, so
    `torch.load(weights_only=True)` reads it): {"arch": "procrustes" | "adapter" | "slerp", "parts": {role: {"arch",
    "embedding_dim", "image_size", "state_dict"}}, "map": {"R": [d_new, d_out], "b": [d_out] (adapter)}, "a": float
    (SLERP)}.
    """
    maps = {k: v.detach().cpu().clone() for k, v in model.map_tensors().items()}
    _composite_meta(model.method, parts, maps)  # refuse an inconsistent description before writing anything
    modules = model.parts()
    payload: dict[str, Any] = {
        "arch": model.method,
        "parts": {
            role: {
                "arch": str(parts[role]["arch"]),
                "embedding_dim": int(parts[role]["embedding_dim"]),
                "image_size": int(parts[role]["image_size"]),
                "state_dict": {k: v.detach().cpu() for k, v in modules[role].state_dict().items()},
            }
            for role in modules
        },
        "map": maps,
    }
    if model.weight is not None:
        payload["a"] = float(model.weight)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return path


# What torch.load, the zip reader and rebuilding the backbone raise on a file that is not ours.
_LOAD_ERRORS = (
    pickle.UnpicklingError, EOFError, RuntimeError, OSError, KeyError, IndexError, TypeError, ValueError,
    AttributeError, zipfile.BadZipFile, UpgradeError,
)  # fmt: skip


def _sniff(path: Path) -> str:
    """"empty", "torch" (a zip holding `*/data.pkl`, what torch.save writes), "zip" (any other zip) or "other"."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head != b"PK\x03\x04":
        return "other"
    try:
        with zipfile.ZipFile(path) as z:
            return "torch" if any(n.endswith("/data.pkl") for n in z.namelist()) else "zip"
    except (zipfile.BadZipFile, OSError):
        return "zip"


def _short_reason(err: BaseException) -> str:
    """One line from a loader's exception, without torch's advice to retry with weights_only=False."""
    if isinstance(err, EOFError):
        return "the file ends early"
    if isinstance(err, KeyError):
        return f"no {err} entry"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    advice = ("weights only load failed", "check the documentation", "please file an issue")
    lines = [line for line in lines if "weights_only" not in line and not line.lower().startswith(advice)]
    text = " ".join(lines) or type(err).__name__
    if isinstance(err, pickle.UnpicklingError):
        text = f"it holds Python objects other than tensors, refused without running them: {text}"
    return text if len(text) <= 200 else text[:197] + "..."


def _checkpoint_problem(path: Path) -> str | None:
    kind = _sniff(path)
    if kind == "empty":
        return "empty file, 0 bytes"
    if kind == "other":
        return "not a zip archive, which torch.save writes"
    if kind == "zip":
        return "a damaged zip archive, or one without the */data.pkl torch.save writes"
    return None


def load_backbone(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild a frozen backbone in eval mode from a checkpoint written by `save_backbone` (or a training-free
    composite written by `save_composite`; its meta then also has "parts", and "a" for SLERP).

    Anything else (empty, truncated, foreign, a pickle of arbitrary objects, weights that do not fit the arch)
    raises one DataError line naming the file; nothing in the file is ever executed (weights_only=True).
    """
    path = Path(path)

    def refuse(reason: str) -> DataError:
        return DataError(f"{path}: not a checkpoint written by this project ({reason})")

    try:
        problem = _checkpoint_problem(path)
        if problem:
            raise refuse(problem)
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says enough
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict):
            raise refuse(f"it holds a {type(payload).__name__}, not the dict save_backbone writes")
        if isinstance(payload.get("arch"), str) and payload["arch"] in _composite_methods():
            return _load_composite(payload, refuse)
        meta = {k: payload[k] for k in ("arch", "embedding_dim", "image_size")}
        model = build_backbone(str(meta["arch"]), int(meta["embedding_dim"]), int(meta["image_size"]))
        state = payload["state_dict"]
    except DataError:
        raise
    except _LOAD_ERRORS as err:
        raise refuse(_short_reason(err)) from None
    try:
        model.load_state_dict(state)
    except _LOAD_ERRORS as err:
        raise refuse(f"its state_dict does not fit arch {meta['arch']!r}: {_short_reason(err)}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta


def _composite_methods() -> tuple[str, ...]:
    from components.training_free import COMPOSITE_PARTS

    return tuple(COMPOSITE_PARTS)


def _load_composite(payload: dict, refuse: Callable[[str], DataError]) -> tuple[nn.Module, dict]:
    """A `save_composite` payload -> (frozen composite, meta); called inside `load_backbone`'s error handling."""
    from components.training_free import rebuild_composite

    method, raw_parts, maps = payload["arch"], payload["parts"], payload["map"]
    if not isinstance(raw_parts, dict) or not all(isinstance(p, dict) for p in raw_parts.values()):
        raise refuse("its 'parts' entry is not a dict of part dicts")
    if not isinstance(maps, dict):
        raise refuse("its 'map' entry is not a dict of tensors")
    meta = _composite_meta(method, raw_parts, maps)
    modules: dict[str, nn.Module] = {}
    for role, part_meta in meta["parts"].items():
        model = build_backbone(part_meta["arch"], part_meta["embedding_dim"], part_meta["image_size"])
        try:
            model.load_state_dict(raw_parts[role]["state_dict"])
        except _LOAD_ERRORS as err:
            raise refuse(
                f"part {role!r}: its state_dict does not fit arch {part_meta['arch']!r}: {_short_reason(err)}"
            ) from None
        modules[role] = model
    composite = rebuild_composite(method, modules, maps, payload.get("a"))
    if composite.weight is not None:
        meta["a"] = composite.weight
    return composite, meta


class TorchEmbedder:
    def __init__(self, path: Path) -> None:
        self.model, meta = load_backbone(path)
        self.dim, self.image_size, self.source = int(meta["embedding_dim"]), int(meta["image_size"]), str(path)

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(x)).numpy()


# ONNX element types an embedder accepts: the float32 batch is cast to the input's type, the output back.
_ONNX_FLOATS: dict[str, type | None] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(bfloat16)": None,  # numpy has no bfloat16: passed as its uint16 bit pattern
}  # fmt: skip
_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


def _to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _from_bfloat16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _read_onnx(path: Path) -> onnx.ModelProto:
    """The graph and its embedded tensors; external data is left unread."""
    import onnx

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise DataError(f"{path}: not an ONNX model ({_short_reason(err)})") from None
    if not model.graph.node or not model.graph.output:
        raise DataError(f"{path}: not an ONNX model (no graph)")
    return model


def external_data(path: Path) -> list[str]:
    """Locations of the side files an ONNX model keeps its weights in, relative to its folder, each checked.

    A location outside the model's folder (absolute, or with `..`) is refused: a model file must not make us
    read, copy or hash files elsewhere on the machine.
    """
    path = Path(path)

    def tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:  # initializers, constants, subgraphs
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    locations: list[str] = []
    for tensor in tensors(_read_onnx(path).graph):
        for entry in tensor.external_data:
            loc = entry.value
            if entry.key != "location" or loc in locations:
                continue
            win = PureWindowsPath(loc)
            if not loc or Path(loc).is_absolute() or win.is_absolute() or win.drive or ".." in win.parts:
                raise DataError(f"{path}: external data location {loc!r} is outside the model's folder; refused")
            if not (path.parent / loc).is_file():
                raise DataError(f"{path}: external data file {loc!r} not found next to the model")
            locations.append(loc)
    return locations


def model_format(path: Path) -> str:
    """"onnx" or "pt", by content: a torch checkpoint is a zip holding `*/data.pkl`, ONNX is protobuf.

    A file whose content says neither is taken by its suffix, so its loader names what is wrong with it.
    """
    path = Path(path)
    try:
        kind = _sniff(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read model file ({err.strerror or err})") from None
    if kind == "torch":
        return "pt"
    if kind == "other" and path.suffix != ".onnx":
        try:
            _read_onnx(path)
            return "onnx"
        except DataError:
            pass
    return "onnx" if path.suffix == ".onnx" else "pt"


def model_files(path: Path) -> list[Path]:
    """The model file, then the external data files it references (ONNX only)."""
    path = Path(path)
    if model_format(path) != "onnx":
        return [path]
    return [path, *(path.parent / loc for loc in external_data(path))]


def model_sha256(path: Path) -> str:
    """Content hash of a model: its file, plus its external data files (by location) when it has any.

    A single-file model hashes as the file itself, so hashes recorded before external data was supported hold.
    """
    path = Path(path)
    files = model_files(path)
    if len(files) == 1:
        return file_sha256(path)
    h = hashlib.sha256(file_sha256(path).encode())
    for f in files[1:]:
        h.update(f.relative_to(path.parent).as_posix().encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


class OnnxEmbedder:
    def __init__(self, path: Path, threads: int = 2) -> None:
        import onnxruntime as ort

        path = Path(path)
        if _sniff(path) == "empty":
            raise DataError(f"{path}: not an ONNX model (empty file, 0 bytes)")
        external_data(path)  # refuses side files outside the model's folder before onnxruntime reads them
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise DataError(f"{path}: cannot load ONNX model ({_short_reason(err)})") from None
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        shape, out_shape = inp.shape, out.shape
        if len(shape) != 4 or shape[1] != 1 or len(out_shape) != 2 or not isinstance(out_shape[1], int):
            raise DataError(
                f"{path}: expected input [n, 1, H, W] and output [n, d], got input {shape}, output {out_shape}"
            )
        for what, arg in (("input", inp), ("output", out)):
            if arg.type not in _ONNX_FLOATS:
                raise DataError(f"{path}: {what} {arg.name!r} is {arg.type}; expected a float type")
        self.input_type, self.output_type = inp.type, out.type
        self.image_size = int(shape[2]) if isinstance(shape[2], int) else -1
        self.dim, self.source = int(out_shape[1]), str(path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # [n, 1, H, W]
        if "tensor(bfloat16)" not in (self.input_type, self.output_type):
            feed = x.astype(_ONNX_FLOATS[self.input_type], copy=False)
            y = self.session.run([self.output_name], {self.input_name: feed})[0]
            return np.asarray(y, dtype=np.float32)  # [n, d]
        return self._run_bfloat16(x)

    def _run_bfloat16(self, x: np.ndarray) -> np.ndarray:
        """onnxruntime's numpy bridge has no bfloat16: bind its bit patterns through OrtValues instead."""
        from onnxruntime import OrtValue

        binding = self.session.io_binding()
        if self.input_type == "tensor(bfloat16)":
            bits_in = OrtValue.ortvalue_from_numpy_with_onnx_type(_to_bfloat16(x), _BFLOAT16)
            binding.bind_ortvalue_input(self.input_name, bits_in)
        else:
            binding.bind_cpu_input(self.input_name, x.astype(_ONNX_FLOATS[self.input_type], copy=False))
        if self.output_type != "tensor(bfloat16)":
            binding.bind_output(self.output_name)
            self.session.run_with_iobinding(binding)
            return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)
        bits = np.empty((len(x), self.dim), dtype=np.uint16)  # [n, d], filled in place by onnxruntime
        binding.bind_ortvalue_output(self.output_name, OrtValue.ortvalue_from_numpy_with_onnx_type(bits, _BFLOAT16))
        self.session.run_with_iobinding(binding)
        return _from_bfloat16(bits)


def load_embedder(path: str | os.PathLike[str], threads: int = 2) -> Embedder:
    """An old or new model: an ONNX file or a checkpoint written by `save_backbone`, told apart by content."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    if model_format(path) == "onnx":
        return OnnxEmbedder(path, threads=threads)
    return TorchEmbedder(path)


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
