"""Saving, loading, exporting and running embedding models (torch checkpoints and ONNX).

Every model here maps stored uint8 pixels, through its own `Preprocess` (components.preprocess: size, channels,
order, mean/std, layout), to raw embeddings [n, d]; the embedded default's is [n, 1, 32, 32] in [-1, 1]. Every
exported ONNX carries its preprocess in its metadata. A backbone checkpoint
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
from components.preprocess import METADATA_KEY, Preprocess, default_preprocess

if TYPE_CHECKING:
    import onnx

    from components.training_free import TrainingFreeEmbedder


class Embedder(Protocol):
    dim: int
    image_size: int  # the side of its square input, or -1 when the model takes any size
    source: str
    preprocess: Preprocess  # how stored pixels become its input

    def __call__(self, x: np.ndarray) -> np.ndarray: ...  # float32 input (preprocess.tensor) -> [n, d]


def _declared(preprocess: Preprocess | None, image_size: int) -> Preprocess:
    return preprocess if preprocess is not None else default_preprocess(image_size)


def _preprocess_entry(preprocess: Preprocess | None, image_size: int) -> dict[str, str]:
    """The checkpoint entry for a preprocess: none for the default one (1 channel at image_size in [-1, 1]), so the
    default's checkpoints stay what they were; its JSON otherwise (a str: weights_only=True reads it)."""
    if preprocess is None or preprocess == default_preprocess(image_size):
        return {}
    return {"preprocess": preprocess.to_json()}


def _read_preprocess(payload: Mapping[str, Any], image_size: int) -> Preprocess:
    text = payload.get("preprocess")
    if text is None:
        return default_preprocess(image_size)
    if not isinstance(text, str):
        raise ValueError(f"its 'preprocess' entry is a {type(text).__name__}, not JSON text")
    return Preprocess.from_json(text)


def save_backbone(
    backbone: nn.Module, path: Path, arch: str, embedding_dim: int, image_size: int, preprocess: Preprocess | None = None
) -> Path:
    """`preprocess`: what the backbone takes (None: 1 channel at image_size, in [-1, 1]); its channel count builds it."""
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    payload = {"arch": arch, "embedding_dim": embedding_dim, "image_size": image_size, "state_dict": state,
               **_preprocess_entry(preprocess, image_size)}  # fmt: skip
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
        role: {"arch": str(m["arch"]), "embedding_dim": int(m["embedding_dim"]), "image_size": int(m["image_size"]),
               **({"preprocess": m["preprocess"]} if m.get("preprocess") is not None else {})}
        for role, m in parts.items()
    }  # fmt: skip
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
    feeds = {_read_preprocess(m, m["image_size"]) for m in metas.values()}
    if len(feeds) != 1:  # one graph, one input: every part must take the same preprocessed pixels
        raise ValueError(f"its parts take different preprocessing {sorted(f.to_json() for f in feeds)}")
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
                **({"preprocess": str(parts[role]["preprocess"])} if parts[role].get("preprocess") is not None else {}),
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
        feed = _read_preprocess(payload, int(meta["image_size"]))
        if "preprocess" in payload:
            meta["preprocess"] = payload["preprocess"]
        model = build_backbone(str(meta["arch"]), int(meta["embedding_dim"]), int(meta["image_size"]), feed.channels)
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
        feed = _read_preprocess(part_meta, part_meta["image_size"])
        model = build_backbone(part_meta["arch"], part_meta["embedding_dim"], part_meta["image_size"], feed.channels)
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
    if "preprocess" in meta["parts"]["new"]:
        meta["preprocess"] = meta["parts"]["new"]["preprocess"]
    return composite, meta


def meta_preprocess(meta: Mapping[str, Any]) -> Preprocess:
    """The preprocess of a model rebuilt by `load_backbone`, from the meta it returned."""
    return _read_preprocess(meta, int(meta["image_size"]))


class TorchEmbedder:
    def __init__(self, path: Path) -> None:
        self.model, meta = load_backbone(path)
        self.dim, self.image_size, self.source = int(meta["embedding_dim"]), int(meta["image_size"]), str(path)
        self.preprocess = meta_preprocess(meta)

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


POOLS = ("none", "mean", "max", "mean_seq", "max_seq", "flatten")


def _pool(y: np.ndarray, pool: str) -> np.ndarray:
    """A tensor of the graph -> embeddings [n, d] (old.pool)."""
    if pool == "none":
        return y
    if pool == "flatten":
        return y.reshape(len(y), -1)
    if pool in ("mean_seq", "max_seq"):  # [n, T, d] -> [n, d]
        return y.mean(axis=1) if pool == "mean_seq" else y.max(axis=1)
    axes = tuple(range(2, y.ndim))  # [n, C, ...] -> [n, C]
    return (y.mean(axis=axes) if pool == "mean" else y.max(axis=axes)) if axes else y


def onnx_preprocess(path: Path) -> Preprocess | None:
    """The `mixbct.preprocess` an ONNX model carries in its metadata (written by `export_onnx`), if any."""
    for prop in _read_onnx(Path(path)).metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return Preprocess.from_json(prop.value)
            except ValueError as err:
                raise DataError(f"{path}: metadata {METADATA_KEY} is not a valid preprocess ({_short_reason(err)})") from None
    return None


class OnnxEmbedder:
    """An ONNX model as an embedder.

    How to feed it, in order: `preprocess` (params: old.preprocess), else the model's own metadata, else `fallback`
    (data.image_size / data.channels in [-1, 1]) with the channels and size read from its declared input where they
    are fixed. A declared input that disagrees with what params or metadata say is refused, naming the field.
    The embedding is its first output, or the tensor named `output` (any tensor of the graph: it is added to the
    graph's outputs), pooled to [n, d] by `pool`.
    """

    def __init__(
        self,
        path: Path,
        threads: int = 2,
        preprocess: Preprocess | None = None,
        output: str | None = None,
        pool: str = "none",
        fallback: Preprocess | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        if _sniff(path) == "empty":
            raise DataError(f"{path}: not an ONNX model (empty file, 0 bytes)")
        if pool not in POOLS:
            raise DataError(f"{path}: old.pool {pool!r} is not one of {', '.join(POOLS)}")
        external_data(path)  # refuses side files outside the model's folder before onnxruntime reads them
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        model_bytes: str | bytes = str(path)
        if output is not None:
            model_bytes = _with_output(path, output)
        try:
            self.session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise DataError(f"{path}: cannot load ONNX model ({_short_reason(err)})") from None
        inp = self.session.get_inputs()[0]
        outputs = {o.name: o for o in self.session.get_outputs()}
        out = outputs[output] if output is not None else self.session.get_outputs()[0]
        self.input_name, self.output_name, self.pool = inp.name, out.name, pool
        shape, out_shape = inp.shape, out.shape
        if len(shape) != 4:
            raise DataError(f"{path}: expected a 4-d image input [n, C, H, W] or [n, H, W, C], got input {shape}")
        if pool == "none" and (len(out_shape) != 2 or not isinstance(out_shape[1], int)):
            raise DataError(f"{path}: expected output [n, d], got {out.name!r} {out_shape}; name the embedding tensor "
                            "(old.output) and how to pool it (old.pool)")  # fmt: skip
        for what, arg in (("input", inp), ("output", out)):
            if arg.type not in _ONNX_FLOATS:
                raise DataError(f"{path}: {what} {arg.name!r} is {arg.type}; expected a float type")
        self.input_type, self.output_type = inp.type, out.type
        self.source = str(path)
        declared = preprocess if preprocess is not None else onnx_preprocess(path)
        where = "old.preprocess" if preprocess is not None else f"its metadata {METADATA_KEY}"
        if declared is None:
            declared = _from_input_shape(path, shape, fallback)
            where = "data.image_size / data.channels"
        _check_input(path, shape, declared, where)
        self.preprocess = declared
        size = declared.size
        spatial = shape[1:3] if declared.layout == "nhwc" else shape[2:4]
        square = size is not None and size[0] == size[1] and all(isinstance(d, int) for d in spatial)
        self.image_size = size[0] if square else -1  # -1: the model takes any size
        if pool == "none":
            self.dim = int(out_shape[1])
        elif size is not None:  # the pooled width, from one all-zero image
            self.dim = int(self(np.zeros((1, *declared.input_shape), dtype=np.float32)).shape[1])
        else:
            raise DataError(f"{path}: cannot tell the embedding size of {out.name!r} pooled by {pool!r} without an input "
                            "size; set old.preprocess.size")  # fmt: skip

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # the preprocessed batch
        if "tensor(bfloat16)" not in (self.input_type, self.output_type):
            feed = x.astype(_ONNX_FLOATS[self.input_type], copy=False)
            y = self.session.run([self.output_name], {self.input_name: feed})[0]
            return np.ascontiguousarray(_pool(np.asarray(y, dtype=np.float32), self.pool))  # [n, d]
        return np.ascontiguousarray(_pool(self._run_bfloat16(x), self.pool))

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
        if self.pool != "none":
            binding.bind_output(self.output_name)
            self.session.run_with_iobinding(binding)
            return _from_bfloat16(np.asarray(binding.copy_outputs_to_cpu()[0]))
        bits = np.empty((len(x), self.dim), dtype=np.uint16)  # [n, d], filled in place by onnxruntime
        binding.bind_ortvalue_output(self.output_name, OrtValue.ortvalue_from_numpy_with_onnx_type(bits, _BFLOAT16))
        self.session.run_with_iobinding(binding)
        return _from_bfloat16(bits)


def _with_output(path: Path, name: str) -> bytes:
    """The model with tensor `name` added to its graph outputs (serialised), so onnxruntime returns it."""
    import onnx

    model = onnx.load_model(str(path), load_external_data=True)  # side files: checked by external_data() first
    if any(o.name == name for o in model.graph.output):
        return model.SerializeToString()
    produced = {t for node in model.graph.node for t in node.output}
    if name not in produced:
        near = sorted(t for t in produced if name.split(".")[0] in t)[:5]
        raise DataError(f"{path}: old.output {name!r} is not a tensor of the graph" + (f" (similar: {near})" if near else ""))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        info = {v.name: v for v in inferred.graph.value_info}.get(name)
    except Exception:  # shape inference is best effort: an unknown type is declared float
        info = None
    model.graph.output.append(info if info is not None else onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def _from_input_shape(path: Path, shape: list[Any], fallback: Preprocess | None) -> Preprocess:
    """No params, no metadata: the fallback (data.* in [-1, 1]) with channels and size taken from the declared input
    where they are fixed (NCHW, the ONNX convention; an input whose second axis is not 1 or 3 but whose last is, NHWC)."""
    base = fallback if fallback is not None else default_preprocess(32)
    nhwc = shape[1] not in (1, 3) and shape[3] in (1, 3)
    c, h, w = (shape[3], shape[1], shape[2]) if nhwc else (shape[1], shape[2], shape[3])
    channels = c if c in (1, 3) else base.channels
    if isinstance(h, int) and isinstance(w, int):
        size: tuple[int, int] | None = (h, w)
    else:
        size = base.size if fallback is not None else None
    mean = base.mean if len(base.mean) in (1, channels) else base.mean[:1]
    std = base.std if len(base.std) in (1, channels) else base.std[:1]
    return Preprocess(size=size, channels=channels, mean=mean, std=std, order=base.order,
                      layout="nhwc" if nhwc else "nchw")  # fmt: skip


def _check_input(path: Path, shape: list[Any], pre: Preprocess, where: str) -> None:
    """Refuse a declared ONNX input that disagrees with the preprocess that will feed it."""
    c, h, w = (shape[3], shape[1], shape[2]) if pre.layout == "nhwc" else (shape[1], shape[2], shape[3])
    if isinstance(c, int) and c != pre.channels:
        raise DataError(f"{path}: the model's input takes {c} channel(s) ({pre.layout}, input {shape}), but {where} "
                        f"says channels = {pre.channels}")  # fmt: skip
    if pre.size is not None:
        for axis, declared, want in (("height", h, pre.size[0]), ("width", w, pre.size[1])):
            if isinstance(declared, int) and declared != want:
                raise DataError(f"{path}: the model's input {axis} is {declared} (input {shape}), but {where} says "
                                f"size = {list(pre.size)}")  # fmt: skip


def load_embedder(
    path: str | os.PathLike[str],
    threads: int = 2,
    preprocess: Preprocess | None = None,
    output: str | None = None,
    pool: str = "none",
    fallback: Preprocess | None = None,
) -> Embedder:
    """An old or new model: an ONNX file or a checkpoint written by `save_backbone`, told apart by content.

    `preprocess`, `output`, `pool` (params: old.*) and `fallback` (data.*) apply to ONNX models, see OnnxEmbedder;
    a checkpoint of this project knows its own preprocess."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    if model_format(path) == "onnx":
        return OnnxEmbedder(path, threads=threads, preprocess=preprocess, output=output, pool=pool, fallback=fallback)
    if output is not None or pool != "none":
        raise DataError(f"{path}: old.output / old.pool apply to ONNX models; a checkpoint of this project outputs its embedding")
    return TorchEmbedder(path)


def check_compatible_dims(old: Embedder, new_dim: int, image_size: int | None = None, name: str | None = None) -> None:
    """Refuse an old model whose embedding size cannot pair with the new model. Input sizes need no check here: each
    model's preprocess resizes the stored images to its own input (and OnnxEmbedder refuses a declared input that
    disagrees with its preprocess)."""
    name = name or old.source
    if old.dim != new_dim:
        raise IncompatibleModel(
            f"{name}: old model outputs {old.dim}-d embeddings but train.embedding_dim is {new_dim}; "
            "MixBCT replaces rows, so both must be equal"
        )


def _embedded(embedder: Embedder, images: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, embeddings [b, d] float32) per batch, in input order; each batch goes through the embedder's own
    preprocess, read and preprocessed ahead by DataLoader workers (components.data.store)."""
    from components.data.store import batches, chunks

    order = chunks(len(images), batch_size)
    for positions, x in zip(order, batches(images, embedder.preprocess, order), strict=True):
        yield int(positions[0]), np.asarray(embedder(x.numpy()), dtype=np.float32)


def extract(
    embedder: Embedder,
    images: np.ndarray,  # [N, H, W] or [N, H, W, 3] uint8, stored pixels (an array or a lazy Rows view)
    batch_size: int = 512,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embeddings [N, d] float32, in input order."""
    out = np.empty((len(images), embedder.dim), dtype=np.float32)
    for start, feats in _embedded(embedder, images, batch_size):
        out[start : start + len(feats)] = feats
        if progress is not None:
            progress(len(feats))
    return out


def extract_to_file(
    embedder: Embedder,
    images: np.ndarray,
    path: Path,
    batch_size: int = 512,
    progress: Callable[[int], None] | None = None,
) -> bool:
    """The embeddings `extract` gives, written batch by batch to the .npy `path` (the bytes np.save would write)
    without ever holding them whole; True when every value is finite."""
    from components.data.store import ArrayWriter

    finite = True
    with ArrayWriter(path, (len(images), embedder.dim), np.float32) as writer:
        for start, feats in _embedded(embedder, images, batch_size):
            writer.write_block(start, feats)
            finite = finite and bool(np.isfinite(feats).all())
            if progress is not None:
                progress(len(feats))
    return finite


def export_onnx(backbone: nn.Module, path: Path, preprocess: Preprocess | int) -> Path:
    """Export with a dynamic batch dimension, weights inside the one .onnx file, and the preprocess that feeds it
    in the model's metadata (`mixbct.preprocess`), so a registered version says how to feed it. An int is the
    default preprocess at that size (1 channel, [-1, 1])."""
    import onnx

    pre = default_preprocess(preprocess) if isinstance(preprocess, int) else preprocess
    if pre.size is None:
        raise ValueError("export_onnx: the preprocess must fix the input size")
    backbone = backbone.eval()
    example = torch.zeros(2, *pre.input_shape)
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
        model = onnx.load_model(str(tmp))
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, METADATA_KEY: pre.to_json()})
        onnx.save_model(model, str(tmp))
    return path


def onnx_parity(backbone: nn.Module, onnx_path: Path, images: np.ndarray, threads: int = 2) -> float:
    """Max |torch − onnxruntime| over the L2-normalised embeddings of stored `images` ([n, H, W] or [n, H, W, 3]
    uint8), both fed by the preprocess the ONNX model declares.

    Normalised, because retrieval compares directions (cosine) and raw embedding norms differ by orders of
    magnitude between models (an IResNet's reach hundreds): the same float32 rounding then reads as the same
    parity whatever the scale."""
    onnx_model = OnnxEmbedder(onnx_path, threads=threads)
    x = onnx_model.preprocess.array(np.ascontiguousarray(images))
    with torch.inference_mode():
        ref = backbone.eval()(torch.from_numpy(x)).double().numpy()
    got = onnx_model(x).astype(np.float64)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    return float(np.max(np.abs(unit(ref) - unit(got))))
