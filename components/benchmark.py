"""The benchmark the paper makes: methods × scenarios × old-model quality × dimension × seeds (plain library).

A grid (benchmarks/grid.yaml) is base overrides plus blocks of axes; each block is a cross product and the grid
is their union. Every cell is a dict of dotted overrides with a stable id. Work that several cells share is
computed once, under the grid work folder, keyed by the config sections it depends on:

    shared/data/<k>/dataset                 per data section
    shared/legacy/<k>/legacy                per (data, legacy, old)
    shared/features/<k>/old_features        per (data, legacy, old, extract)
    shared/paragon/<k>/paragon              per (data, train without method/method_args, seed)
    shared/new/<k>/new                      per full config
    cells/<id>/                             a `Paths` work folder: symlinks to the above + eval/, cell.json

Each shared folder is a `Paths` root whose inputs are symlinks too, so the stage functions run unchanged.
Stages write atomically, so an existing output folder is complete; a cell is done when its `cell.json` exists.
components.benchmark_report reads the recorded cells back: aggregation over seeds, the claims, the report.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.config import Config, load_config
from components.errors import ConfigError
from components.io import write_json
from components.keys import shared
from components.paths import Paths

# Overrides that make a cell an ablation of the method rather than another setting.
ABLATION_KEYS = ("train.method_args.alpha", "train.method_args.weight_scale", "extract.credible_keep",
                 "train.method_args.l2_weight", "train.method_args.base", "train.augment",
                 "train.method_args.skip_replaced")  # fmt: skip


# ----------------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Cell:
    id: str
    overrides: dict[str, Any]  # dotted keys, base included
    ablation: str  # "-" or e.g. "train.method_args.alpha=0.1"


@dataclass(frozen=True)
class Grid:
    name: str
    base: dict[str, Any]
    cells: tuple[Cell, ...]
    description: str = ""
    estimated_hours: float | None = None
    source: str = ""


def cell_id(overrides: Mapping[str, Any]) -> str:
    """Stable id: readable method prefix + hash of the sorted overrides."""
    digest = hashlib.sha256(json.dumps(dict(overrides), sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{overrides.get('train.method', 'mixbct')}-{digest}"


def expand(name: str, spec: Mapping[str, Any], source: str = "") -> Grid:
    """Base overrides + blocks of axes -> the union of each block's cross product, in order, without duplicates."""
    base = dict(spec.get("base") or {})
    blocks = spec.get("blocks")
    if not blocks:
        raise ConfigError(f"grid {name!r}: needs a non-empty `blocks` list (each with `axes`)")
    cells: dict[str, Cell] = {}
    for block in blocks:
        axes = dict(block.get("axes") or {})
        extra = dict(block.get("set") or {})
        keys = list(axes)
        for values in itertools.product(*(axes[k] if isinstance(axes[k], list) else [axes[k]] for k in keys)):
            overrides = {**base, **extra, **dict(zip(keys, values, strict=True))}
            ablated = [f"{k}={overrides[k]}" for k in ABLATION_KEYS if k in overrides and overrides.get(k) != base.get(k)]
            cell = Cell(cell_id(overrides), overrides, ", ".join(ablated) or "-")
            cells.setdefault(cell.id, cell)
    return Grid(name, base, tuple(cells.values()), str(spec.get("description", "")), spec.get("estimated_hours"), source)


def load_grid(grid: str, grids_file: str | Path = "benchmarks/grid.yaml") -> Grid:
    """`grid` is a name in `grids_file`, or the path of a YAML file holding one grid (base + blocks)."""
    as_path = Path(grid)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return expand(as_path.stem, yaml.safe_load(as_path.read_text()) or {}, str(as_path))
    grids = yaml.safe_load(Path(grids_file).read_text()) or {}
    if grid not in grids:
        raise ConfigError(f"unknown grid {grid!r}; known: {', '.join(grids)} (or pass a path to a grid .yaml)")
    return expand(grid, grids[grid], str(grids_file))


# ----------------------------------------------------------------------------------------------- shared work


@dataclass(frozen=True)
class Plan:
    """One cell's resolved config and the work folders it reads and writes."""

    cell: Cell
    cfg: Config
    keys: dict[str, str]
    workdir: Path
    roots: dict[str, Paths] = field(default_factory=dict)  # piece -> Paths root that builds it

    @property
    def paths(self) -> Paths:
        return Paths(self.workdir / "cells" / self.cell.id)

    @property
    def cell_json(self) -> Path:
        return self.paths.root / "cell.json"


# piece -> (output folder name inside its root, pieces it reads)
PIECES: dict[str, tuple[str, tuple[str, ...]]] = {
    "data": ("dataset", ()),
    "legacy": ("legacy", ("data",)),
    "features": ("old_features", ("data", "legacy")),
    "paragon": ("paragon", ("data",)),
    "new": ("new", ("data", "legacy", "features")),
}
# piece -> the stage of components.pipeline that builds it
STAGE_OF = {"data": "prepare", "legacy": "legacy", "features": "extract", "paragon": "paragon", "new": "train"}


def plan(grid: Grid, params: str | Path, workdir: str | Path) -> list[Plan]:
    """Resolve every cell's config (failing on a bad override before any work) and its shared folders."""
    workdir = Path(workdir)
    plans = []
    for cell in grid.cells:
        cfg = load_config(params, cell.overrides)
        keys = shared(cfg)  # components.keys: what each piece depends on
        roots = {piece: Paths(workdir / "shared" / piece / keys[piece]) for piece in PIECES}
        plans.append(Plan(cell, cfg, keys, workdir, roots))
    return plans


def source_piece(plan: Plan, piece: str) -> str:
    """The piece that actually builds `piece` for this cell.

    A `none` cell's new model is the paragon: the same method, config and seed (stages.train seeds both
    alike), so it is trained once and shared instead of twice.
    """
    if piece == "new" and plan.cfg.train.method == "none":
        return "paragon"
    return piece


def output(plan: Plan, piece: str) -> Path:
    """The folder a shared piece writes (complete once it exists: stages write atomically)."""
    piece = source_piece(plan, piece)
    return plan.roots[piece].root / PIECES[piece][0]


def is_built(plan: Plan, piece: str) -> bool:
    return output(plan, piece).is_dir()


def symlink(target: Path, link: Path) -> None:
    """Point `link` at `target` (relative), atomically: a new link is renamed over any old one."""
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == rel:
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(rel, tmp)
    os.replace(tmp, link)


def link_inputs(plan: Plan, piece: str) -> Paths:
    """Make `piece`'s builder root see the pieces it reads; return that root, ready for the stage function."""
    root = plan.roots[piece]
    for dep in reads(plan, piece):
        symlink(output(plan, dep), root.root / PIECES[dep][0])
    return root


def reads(plan: Plan, piece: str) -> tuple[str, ...]:
    """The pieces `piece` reads for this cell: a training-free method's new model also reads the paragon it maps
    (built before it, so it is trained once, in its shared folder)."""
    from components.training_free import TRAINING_FREE

    deps = PIECES[piece][1]
    if piece == "new" and plan.cfg.train.method in TRAINING_FREE and plan.cfg.train.paragon:
        deps = (*deps, "paragon")
    return deps


def link_cell(plan: Plan) -> Paths:
    """The cell's own `Paths` work folder: dataset/legacy/old_features/paragon/new are links to shared work. A
    stale record (`is_done` said no) goes first, so that an interruption cannot leave it beside the new links."""
    plan.cell_json.unlink(missing_ok=True)
    for piece, (name, _) in PIECES.items():
        if piece == "paragon" and not plan.cfg.train.paragon:
            continue
        symlink(output(plan, piece), plan.paths.root / name)
    return plan.paths


def is_done(plan: Plan) -> bool:
    """The cell has its record and that record came from the shared work its config names now. A cell id hashes
    the cell's overrides only, so after a change of the base params (another `--params`, an edited params.yaml)
    the same id can point at other models: its links then differ and the cell is computed again."""
    return plan.cell_json.is_file() and _links_current(plan)


def _links_current(plan: Plan) -> bool:
    for piece, (name, _) in PIECES.items():
        if piece == "paragon" and not plan.cfg.train.paragon:
            continue
        link = plan.paths.root / name
        if not link.is_symlink() or os.readlink(link) != os.path.relpath(output(plan, piece), link.parent):
            return False
    return True


def labels(plan: Plan) -> dict[str, Any]:
    """The aggregation axes of a cell."""
    cfg = plan.cfg
    return {
        "method": cfg.train.method,
        "scenario": cfg.data.scenario,
        "old": cfg.legacy.head,
        "dim": cfg.train.embedding_dim,
        "ablation": plan.cell.ablation,
        "seed": cfg.train.seed,
    }


def training_terms(history_json: Path) -> dict[str, dict[str, float]] | None:
    """The loss terms of the new model's first and last epoch (each method's history names its own: `cls`,
    `influence`, `align`, ...), so a report can say how much a compatibility term acted, not only that the
    cross-test did not move. None for a model without a training history (the training-free maps)."""
    if not history_json.is_file():
        return None
    history = json.loads(history_json.read_text())
    if not history:
        return None
    skip = {"epoch", "lr", "seconds", "mixed_rows"}
    pick = lambda row: {k: float(v) for k, v in row.items() if k not in skip and isinstance(v, (int, float))}  # noqa: E731
    return {"first": pick(history[0]), "last": pick(history[-1])}


def record_cell(plan: Plan) -> dict[str, Any]:
    """Write `cell.json` (labels, overrides, the test set's pairs, criterion, intervals of the differences and
    negative flips, backfill AUCs, and the same for the shifted and validation sets) atomically from the cell's
    evaluation."""
    metrics = json.loads((plan.paths.eval / "metrics.json").read_text())

    def brief(record: dict[str, Any]) -> dict[str, Any]:
        boot = record.get("bootstrap") or {}
        return {"pairs": record["pairs"], "criterion": record["criterion"],
                "differences": boot.get("differences"), "negative_flips": boot.get("negative_flips")}  # fmt: skip

    backfill = {order: {"auc": c.get("auc"), "dips": c.get("dips")} for order, c in (metrics.get("backfill") or {}).items()}
    record = {"id": plan.cell.id, "overrides": plan.cell.overrides, **labels(plan), **brief(metrics),
              "backfill": backfill, "sets": {k: brief(v) for k, v in (metrics.get("sets") or {}).items()},
              "training": training_terms(plan.paths.model_dir("new") / "history.json")}  # fmt: skip
    write_json(plan.cell_json, record)
    return record
