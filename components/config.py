"""One typed, frozen config tree loaded once from params.yaml.

Each component receives only its own section. Unknown or mistyped keys fail with the file and the dotted
field name, so a typo in params.yaml never silently falls back to a default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from components.errors import ConfigError
from components.preprocess import Preprocess, default_preprocess

Scenario = Literal["open-class", "open-data", "extended-class", "extended-data"]


class Section(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `alpha: .nan` is refused here, not minutes later inside training.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


def _known_arch(value: str) -> str:
    from components.models import available_archs

    if value not in available_archs():
        raise ValueError(f"unknown architecture {value!r}; known: {', '.join(available_archs())}")
    return value


class DataConfig(Section):
    """How identities and samples are drawn, and how they split (method.md, "Upgrade scenarios")."""

    # kanjivg (embedded) | imagefolder (root/<identity>/<image>) | recordio (insightface train.rec + .idx: root is
    # the .rec or its folder) | webdataset (root: a folder of .tar shards, a glob or shard-{000000..000009}.tar)
    source: Literal["kanjivg", "imagefolder", "recordio", "webdataset"] = "kanjivg"
    root: str = "data/kanjivg"  # raw source, tracked by data.dvc
    # Where pixels live between stages: "array" (decoded once by the prepare stage into one images.npy, read per
    # batch) or "source" (nothing stored: each read decodes from the raw files, for sets too large to copy).
    # null: array for kanjivg and imagefolder, source for recordio and webdataset.
    store: Literal["array", "source"] | None = None
    # With store "source", validation reads every record's header (labels) and fully decodes this many seeded
    # images per source file (all of an ImageFolder's): a broken payload elsewhere fails when training reads it.
    verify_decode: int = Field(256, ge=0)
    image_size: int = Field(32, ge=8, le=512)  # stored images are image_size x image_size
    channels: Literal[1, 3] = 1  # stored channels: 1 (grayscale) or 3 (RGB)
    seed: int = 0
    scenario: Scenario = "open-class"
    # KanjiVG: identities are drawn from the raw folder; ImageFolder: every identity folder is used.
    train_identities: int = Field(4500, ge=2)  # pool the old and new models train on (kanjivg only)
    test_identities: int = Field(2000, ge=2)  # never trained on; gallery + query renderings
    # Validation identities, disjoint from training and test: every choice is made on them. null: a tenth of
    # test_identities (at least 2); 0: no validation split (a choice that needs one then fails naming this key).
    val_identities: int | None = Field(None, ge=0)
    # Shifted evaluation set: the test identities in another style. null: "kaisho" for kanjivg (its variant forms),
    # "none" for imagefolder.
    shift: Literal["kaisho", "none"] | None = None
    old_fraction: float = Field(0.3, gt=0.0, lt=1.0)  # 30% of classes (open/extended-class) or of samples (-data)
    samples_per_identity: int = Field(10, ge=2)  # training renderings per identity (kanjivg only)
    gallery_per_identity: int = Field(1, ge=1)
    query_per_identity: int = Field(2, ge=1)
    # ImageFolder: an image with more pixels (width x height, read from its header) is refused before decoding.
    max_pixels: int = Field(4096 * 4096, ge=1)

    @property
    def validation_identities(self) -> int:
        return self.val_identities if self.val_identities is not None else max(2, round(self.test_identities / 10))

    @property
    def storage(self) -> str:
        return self.store if self.store is not None else ("source" if self.source in ("recordio", "webdataset") else "array")

    @property
    def shift_style(self) -> str:
        return self.shift if self.shift is not None else ("kaisho" if self.source == "kanjivg" else "none")

    @model_validator(mode="after")
    def _shift_needs_kanjivg(self) -> DataConfig:
        if self.shift == "kaisho" and self.source != "kanjivg":
            raise ValueError("data.shift: kaisho needs data.source: kanjivg (its variant forms); use none")
        if self.store == "source" and self.source == "kanjivg":
            raise ValueError("data.store: source needs raw image files; KanjiVG glyphs are rendered once (array)")
        return self


class LegacyConfig(Section):
    """The old model a real user already has. Trained here only when `old.model` is null."""

    arch: str = "small_cnn"
    head: Literal["softmax", "arcface"] = "softmax"
    embedding_dim: int = Field(128, ge=2)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    grad_clip: float = Field(5.0, gt=0)
    seed: int = 0
    # What the old model takes (components.preprocess): null = the stored size and channels, scaled to [-1, 1].
    preprocess: Preprocess | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return _known_arch(value)


class OldConfig(Section):
    """Bring your own old model and gallery. null = use what the legacy stage trains and writes."""

    model: str | None = None  # .onnx or .pt (a checkpoint written by this project)
    # .npz with `embeddings` [n, d] and `paths` [n] (ImageFolder images, `identity/file` or longer) or `ids` [n]
    # (manifest ids), in any order and possibly more rows than the test gallery; a .parquet with the same columns
    # (`embeddings` a list of floats per row); or .npy [n_gallery, d] with rows in gallery-manifest order.
    gallery: str | None = None
    # How to feed the old model: null = its ONNX metadata (`mixbct.preprocess`, written by this project's exports),
    # else data.image_size / data.channels scaled to [-1, 1]; the model's declared input shape is checked either way.
    preprocess: Preprocess | None = None
    # The embedding: a named tensor of the graph (null = the model's first output) and how to pool it to [n, d]:
    # none (already [n, d]), mean / max over every axis after the first two ([n, C, ...] -> [n, C]), mean_seq /
    # max_seq over axis 1 ([n, T, d] -> [n, d], e.g. a text recogniser's sequence features), flatten.
    output: str | None = None
    pool: Literal["none", "mean", "max", "mean_seq", "max_seq", "flatten"] = "none"

    @model_validator(mode="after")
    def _both_or_neither(self) -> OldConfig:
        if (self.model is None) != (self.gallery is None):
            raise ValueError("old.model and old.gallery must be given together (or both null)")
        for key in ("model", "gallery"):
            value = getattr(self, key)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"old.{key}: file not found: {value}")
        if self.model is not None and Path(self.model).suffix not in (".onnx", ".pt"):
            raise ValueError(f"old.model: expected a .onnx or .pt file, got {self.model}")
        if self.gallery is not None and Path(self.gallery).suffix not in (".npy", ".npz", ".parquet"):
            raise ValueError(f"old.gallery: expected a .npz or .parquet (keyed rows) or .npy (manifest order) file, got {self.gallery}")
        return self


class ExtractConfig(Section):
    """Old-feature extraction and MixBCT's denoising (credible samples)."""

    credible_keep: float = Field(0.9, gt=0, le=1)  # T: keep ratio per class, not a distance
    batch_size: int = Field(512, ge=1)
    shard_rows: int = Field(65_536, ge=1)  # rows per Dask task when runtime.dask is set (rounded to whole batches)


def all_methods() -> list[str]:
    """Every `train.method`: the compatibility losses (components/losses) and the training-free maps on the
    paragon (components/training_free.py)."""
    from components.losses import available_methods
    from components.training_free import TRAINING_FREE

    return sorted({*available_methods(), *TRAINING_FREE})


def method_args_type(name: str) -> type:
    """The typed model of method `name`'s own arguments."""
    from components.training_free import TRAINING_FREE

    if name in TRAINING_FREE:
        return TRAINING_FREE[name]
    from components.losses import method_args_model

    return method_args_model(name)


class TrainConfig(Section):
    """The new model. Recipe from method.md (authors' code), scaled to CPU."""

    # mixbct | none (the paragon) | a baseline (bct, unibct, nccl, lce, advbct, l2, weakened_l2, and the MixBCT
    # authors' variants *_authors) | a training-free map on the paragon (procrustes, slerp, adapter)
    method: str = "mixbct"
    arch: str = "resnet_small"
    embedding_dim: int = Field(128, ge=2)
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    grad_clip: float = Field(5.0, gt=0)
    arcface_s: float = Field(64.0, gt=0)
    arcface_m: float = Field(0.5, ge=0)
    # The method's own arguments, checked against its model (components/losses/<method>.py), which holds the
    # defaults (mixbct: {alpha: 0.3}); resolved with them, so `{}` and `{alpha: 0.3}` are the same model (one key)
    # and the run logs every value. The paragon (method "none") gets none. Either flat ({alpha: 0.5}: for the
    # selected method) or per method ({mixbct: {alpha: 0.5}}: each method's entry applies when it is selected).
    method_args: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    hflip: bool = False  # mirrored glyphs are other characters; faces would use True
    # none | style: a seeded random affine map and stroke-width change per training image (components/augment.py),
    # a candidate remedy for compatibility under a style shift, measured on validation (`--grid shift-study`)
    augment: Literal["none", "style"] = "none"
    # What the new model takes (components.preprocess): null = the stored size and channels, scaled to [-1, 1].
    preprocess: Preprocess | None = None
    paragon: bool = True  # also train method "none" as the upper bound
    seed: int = 0

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return _known_arch(value)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        known = all_methods()
        if value not in known:
            raise ValueError(f"unknown method {value!r}; known: {', '.join(known)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _alpha_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "alpha" in data:
            raise ValueError("train.alpha moved to train.method_args.alpha (each method owns its arguments)")
        return data

    @field_validator("method_args")
    @classmethod
    def _method_args(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # A field validator (not a model one) so that errors read `train.method_args.<field>`.
        if "method" not in info.data:  # the method name itself is wrong; that error is reported
            return value
        method = info.data["method"]
        # Per-method form: {mixbct: {alpha: 0.5}, lce: {...}}: each entry is checked against its method, the
        # selected method's entry applies, and flat keys (e.g. `-S train.method_args.alpha=0.7`) override it. So a
        # project default for one method survives `-S train.method=l2`.
        known = set(all_methods())
        scoped = {k: v for k, v in value.items() if k in known}
        flat = {k: v for k, v in value.items() if k not in known}
        for name, args in scoped.items():
            if not isinstance(args, dict):
                raise ValueError(f"{name}: expected a mapping of {name}'s arguments, got {args!r}")
            try:
                method_args_type(name).model_validate(args)
            except ValidationError as err:
                where = ".".join(str(p) for p in err.errors()[0]["loc"])
                raise ValueError(f"{name}.{where}: {err.errors()[0]['msg']}") from None
        merged = {**(scoped.get(method) or {}), **flat}
        return method_args_type(method).model_validate(merged).model_dump(mode="json")


class IjbConfig(Section):
    """An IJB-C-style protocol (components.ijb): root/meta/{name}_face_tid_mid.txt, the template pairs and 1:N files;
    the image names are files under `images` (insightface: the loose_crop folder)."""

    root: str
    images: str
    name: str = "ijbc"

    @model_validator(mode="after")
    def _exists(self) -> IjbConfig:
        if not (Path(self.root) / "meta" / f"{self.name}_face_tid_mid.txt").is_file():
            raise ValueError(f"root: {self.root}/meta/{self.name}_face_tid_mid.txt not found")
        if not Path(self.images).is_dir():
            raise ValueError(f"images: folder not found: {self.images}")
        return self


class EvaluateConfig(Section):
    # Face teams' own sets, scored for every model pair beside the test table (components.face_eval):
    # insightface .bin verification files (lfw.bin, cfp_fp.bin, ...) and an IJB-C-style protocol.
    verification: tuple[str, ...] = ()
    ijb: IjbConfig | None = None
    gate_metrics: tuple[str, ...] = ("top1", "tar@far=1e-3")
    # What the gate requires of (new/old − old/old) and (new/new − old/old) per gate metric: "interval", the lower
    # bound of its paired-bootstrap confidence interval above 0 (the default); "point", the estimate above 0
    # (BCT's criterion as written, blind to sampling noise).
    gate_on: Literal["interval", "point"] = "interval"
    confidence: float = Field(0.95, gt=0.5, lt=1)  # level of every interval
    bootstrap_resamples: int = Field(1000, ge=100)  # paired bootstrap over test identities (components.stats)
    bootstrap_seed: int = 0
    gate_shift: bool = False  # also require the criterion on the shifted evaluation set (data.shift)
    # Optional bound on the share of old/old-correct queries that new/old gets wrong at top-1 (negative flips).
    max_negative_flips: float | None = Field(None, ge=0, le=1)
    backfill_steps: int = Field(10, ge=2)  # partial-backfill curve at beta = 0, 1/steps, ..., 1
    # The gallery index of every search (components/ann.py): a faiss index-factory string ("Flat" = exact;
    # "IVF4096,Flat", "HNSW32", "IVF4096,PQ32", ...) and its search knobs ("nprobe=32", "efSearch=128"). An
    # approximate index's recall@1 against exact search and both throughputs are reported beside the metrics.
    index: str = "Flat"
    index_params: str = ""
    # max |torch − onnxruntime| over L2-normalised embeddings an exported model may show (components.embed.onnx_parity):
    # the legacy stage's check and the registration gate
    onnx_tolerance: float = Field(1e-4, gt=0)

    @field_validator("verification")
    @classmethod
    def _bin_files(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        missing = [v for v in value if not Path(v).is_file()]
        if missing:
            raise ValueError(f"file not found: {missing[0]}")
        return value

    @field_validator("gate_metrics")
    @classmethod
    def _known_metrics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from components.evaluate import METRICS

        unknown = [m for m in value if m not in METRICS]
        if unknown or not value:
            raise ValueError(f"unknown gate metric(s) {unknown}; known: {', '.join(METRICS)}")
        return value


class RegisterConfig(Section):
    tracking_uri: str = "sqlite:///mlflow/mlflow.db"
    artifact_root: str = "mlflow/artifacts"
    experiment: str = "mixbct-upgrade"
    model_name: str = "kanji-embedder"


class RuntimeConfig(Section):
    """How every stage runs, not what it computes: never part of a model's key or the upgrade key."""

    threads: int = Field(2, ge=1)  # torch, faiss and onnxruntime threads (set explicitly: both bring OpenMP)
    workers: int = Field(2, ge=1)  # processes that render or decode images (prepare)
    # DataLoader processes that read and preprocess batches ahead of training and extraction. null: 0 (in the
    # stage's own process) for stored images (data.store: array: a batch is one read), runtime.workers when every
    # read decodes from the raw files (data.store: source).
    loader_workers: int | None = Field(None, ge=0)
    # Where training runs (components/device.py): auto = CUDA when torch sees a GPU, else the CPU; precision auto =
    # bf16 autocast on a GPU (fp16 + loss scaling where bf16 is missing), fp32 on the CPU; channels_last null = on
    # for CUDA. Weights and checkpoints stay fp32, so a run resumes on another device. ONNX export and parity run on
    # the CPU whatever the device.
    # The Prefect flow's old-feature extraction on a Dask cluster (flows/extract.py): null = in the flow's own process;
    # "local" = a local cluster of dask_workers single-threaded processes; or a scheduler address (tcp://host:8786)
    # whose workers see the work folder at the same path. `dvc repro` always extracts in its own process.
    dask: str | None = None
    dask_workers: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None
    # Data-parallel training with torchrun (components/distributed.py): the train and paragon stages run their
    # training on nproc_per_node processes of this machine (one GPU each on CUDA; on the CPU runtime.threads is
    # shared between them); the global batch and schedule stay train.*. dist_backend auto = nccl on CUDA, gloo on
    # the CPU. sync_batchnorm (CUDA only) normalises over the global batch. torchrun_args: extra torchrun options
    # (e.g. ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "host:29400"] for several machines).
    # torch.compile the backbone while it trains (inductor; needs a C compiler): faster steps on long trainings
    # (benchmarks/run.py flops), a minute or so of compilation, float rounding that differs from eager mode.
    compile: bool = False
    nproc_per_node: int = Field(1, ge=1)
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    sync_batchnorm: bool = False
    torchrun_args: list[str] = []


class Config(Section):
    runtime: RuntimeConfig = RuntimeConfig()
    data: DataConfig = DataConfig()
    legacy: LegacyConfig = LegacyConfig()
    old: OldConfig = OldConfig()
    extract: ExtractConfig = ExtractConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegisterConfig = RegisterConfig()

    @model_validator(mode="after")
    def _dims_match(self) -> Config:
        if self.old.model is None and self.legacy.embedding_dim != self.train.embedding_dim:
            raise ValueError(
                f"legacy.embedding_dim ({self.legacy.embedding_dim}) != train.embedding_dim "
                f"({self.train.embedding_dim}): MixBCT swaps rows, so old and new dimensions must be equal"
            )
        return self

    def preprocess(self, role: str) -> Preprocess:
        """The input contract of the project's "legacy" (old, trained here) or "new" (new and paragon) model."""
        declared = {"legacy": self.legacy.preprocess, "new": self.train.preprocess}[role]
        return declared if declared is not None else default_preprocess(self.data.image_size, self.data.channels)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted keys, for MLflow params."""
        out: dict[str, Any] = {}
        for section, values in self.as_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.method=none` -> ("train.method", "none"); values parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.method=none")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_config(path: str | Path | None = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read params.yaml, apply dotted overrides, validate, freeze.

    A params file that does not exist is an error naming it (a typo must never run the built-in defaults);
    `path=None` asks for the built-in defaults explicitly.
    """
    raw: dict[str, Any] = {}
    path = Path(path) if path is not None else Path("(built-in defaults)")
    if path.name != "(built-in defaults)":
        if not path.is_file():
            raise ConfigError(f"{path}: params file not found" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown key (typo?)"
            lines.append(f"  {field}: {msg}")
        raise ConfigError(f"{path}: invalid parameters:\n" + "\n".join(lines)) from None
