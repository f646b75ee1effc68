"""The benchmark the paper makes: methods × scenarios × old-model quality × dimension × seeds (plain library).

A grid (benchmarks/grid.yaml) is base overrides plus blocks of axes; each block is a cross product and the grid
is their union. Every cell is a dict of dotted overrides with a stable id. Work that several cells share is
computed once, under the grid work folder, keyed by the config sections it depends on:

    shared/data/<k>/dataset                 per data section
    shared/legacy/<k>/legacy                per (data, legacy, old)
    shared/features/<k>/old_features        per (data, legacy, old, extract)
    shared/paragon/<k>/paragon              per (data, train without method/alpha, seed)
    shared/new/<k>/new                      per full config
    cells/<id>/                             a `Paths` work folder: symlinks to the above + eval/, cell.json

Each shared folder is a `Paths` root whose inputs are symlinks too, so the stage functions run unchanged.
Stages write atomically, so an existing output folder is complete; a cell is done when its `cell.json` exists.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.config import Config, load_config
from components.errors import ConfigError
from components.evaluate import CompatibilityTable, Criterion, criterion
from components.io import atomic_path, write_json, write_text
from components.paths import Paths

# Overrides that make a cell an ablation of the method rather than another setting.
ABLATION_KEYS = ("train.alpha", "extract.credible_keep")
# The headline setting of the paper's comparison: open-class, weak (softmax) old model, d = 128, no ablation.
HEADLINE = ("open-class", "softmax", 128, "-")
REPORT_METRICS = ("top1", "mAP", "tar@far=1e-3")
TRAIN_METHOD_KEYS = ("method", "alpha", "paragon", "threads")  # what a paragon does not depend on


# ----------------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Cell:
    id: str
    overrides: dict[str, Any]  # dotted keys, base included
    ablation: str  # "-" or e.g. "train.alpha=0.1"


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


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shared_keys(cfg: Config) -> dict[str, str]:
    """Which shared folder each piece of a cell's work lives in (equal keys = computed once)."""
    d = cfg.as_dict()
    data = _key("data", d["data"])
    legacy = _key("legacy", data, d["legacy"], d["old"])
    features = _key("features", legacy, d["extract"], cfg.train.embedding_dim)
    train_common = {k: v for k, v in d["train"].items() if k not in TRAIN_METHOD_KEYS}
    paragon = _key("paragon", data, train_common)
    new = _key("new", features, {k: v for k, v in d["train"].items() if k not in ("paragon", "threads")})
    return {"data": data, "legacy": legacy, "features": features, "paragon": paragon, "new": new}


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


def plan(grid: Grid, params: str | Path, workdir: str | Path) -> list[Plan]:
    """Resolve every cell's config (failing on a bad override before any work) and its shared folders."""
    workdir = Path(workdir)
    plans = []
    for cell in grid.cells:
        cfg = load_config(params, cell.overrides)
        keys = shared_keys(cfg)
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
    for dep in PIECES[piece][1]:
        symlink(output(plan, dep), root.root / PIECES[dep][0])
    return root


def link_cell(plan: Plan) -> Paths:
    """The cell's own `Paths` work folder: dataset/legacy/old_features/paragon/new are links to shared work."""
    for piece, (name, _) in PIECES.items():
        if piece == "paragon" and not plan.cfg.train.paragon:
            continue
        symlink(output(plan, piece), plan.paths.root / name)
    return plan.paths


def is_done(plan: Plan) -> bool:
    return plan.cell_json.is_file()


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


def record_cell(plan: Plan) -> dict[str, Any]:
    """Write `cell.json` (labels, overrides, metrics pairs, criterion) atomically from the cell's evaluation."""
    metrics = json.loads((plan.paths.eval / "metrics.json").read_text())
    record = {"id": plan.cell.id, "overrides": plan.cell.overrides, **labels(plan),
              "pairs": metrics["pairs"], "criterion": metrics["criterion"]}  # fmt: skip
    write_json(plan.cell_json, record)
    return record


def load_cells(plans: Sequence[Plan]) -> list[dict[str, Any]]:
    return [json.loads(p.cell_json.read_text()) for p in plans if p.cell_json.is_file()]


# ----------------------------------------------------------------------------------------------- aggregation


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def setting_of(record: Mapping[str, Any]) -> tuple[str, str, int, str]:
    return (record["scenario"], record["old"], int(record["dim"]), record["ablation"])


def aggregate(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std (sample std; 0 for one seed) over seeds per (setting, method)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((*setting_of(r), r["method"]), []).append(r)
    rows = []
    for (scenario, old, dim, ablation, method), rs in groups.items():
        row: dict[str, Any] = {"scenario": scenario, "old": old, "dim": dim, "ablation": ablation, "method": method,
                               "seeds": len(rs), "passes": sum(bool(r["criterion"]["passed"]) for r in rs)}  # fmt: skip
        for pair in ("old/old", "new/old", "new/new"):
            for m in REPORT_METRICS:
                row[f"{pair}.{m}"] = _mean_std([r["pairs"][pair].get(m) for r in rs if pair in r["pairs"]])
        derived = [_derived(r) for r in rs]
        for extra in ("update_gain", "retention"):
            row[f"{extra}.top1"] = _mean_std([(getattr(c, extra) or {}).get("top1", math.nan) for c in derived])
        rows.append(row)
    return rows


def _derived(record: Mapping[str, Any]) -> Criterion:
    """Update gain and retention recomputed from the cell's pairs by `evaluate.criterion`, the one definition
    (a cell recorded by an older version keeps its pairs; what is derived from them follows the code)."""
    table = CompatibilityTable.from_dict(record["pairs"])
    paragon = "paragon" if ("paragon", "paragon") in table.rows else None
    return criterion(table, paragon=paragon, gate_metrics=record["criterion"].get("gate_metrics") or ("top1",))


def _mean(row: Mapping[str, Any], col: str) -> float:
    return row[col][0]


def claims(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims, checked on the aggregated numbers (means over seeds, top1 unless said otherwise).

    (a) MixBCT passes the criterion in every scenario (every seed of every non-ablation setting);
    (b) with a weak (softmax) old model, MixBCT's cross-test top1 ≥ BCT's and ≥ L2's;
    (c) MixBCT's self-test top1 ≥ L2's (every setting where both ran).
    A claim with no cells to check is "not measured", never true.
    """
    by = {(setting_of(r), r["method"]): r for r in rows}
    settings = sorted({setting_of(r) for r in rows}, key=str)
    out = []

    mix = [by[(s, "mixbct")] for s in settings if (s, "mixbct") in by and s[3] == "-"]
    a_ok = all(r["passes"] == r["seeds"] for r in mix)
    failing = [f"{r['scenario']}/{r['old']}/d{r['dim']}" for r in mix if r["passes"] != r["seeds"]]
    out.append({"claim": "(a) MixBCT passes the criterion in every scenario",
                "holds": a_ok if mix else None,
                "evidence": (f"{len(mix)} setting(s); fails in: {', '.join(failing)}" if failing
                             else f"passes in all {len(mix)} setting(s)")})  # fmt: skip

    checks_b = []
    for s in settings:
        if s[1] != "softmax" or s[3] != "-" or (s, "mixbct") not in by:
            continue
        for other in ("bct", "l2"):
            if (s, other) in by:
                m, o = _mean(by[(s, "mixbct")], "new/old.top1"), _mean(by[(s, other)], "new/old.top1")
                checks_b.append((s, other, m, o, m >= o))
    out.append({"claim": "(b) weak old model: MixBCT cross-test ≥ BCT and ≥ L2",
                "holds": all(c[4] for c in checks_b) if checks_b else None,
                "evidence": "; ".join(f"{s[0]}/d{s[2]}: mixbct {m:.4f} vs {o_} {o:.4f}" for s, o_, m, o, _ in checks_b)
                or "not measured"})  # fmt: skip

    checks_c = []
    for s in settings:
        if (s, "mixbct") in by and (s, "l2") in by:
            m, o = _mean(by[(s, "mixbct")], "new/new.top1"), _mean(by[(s, "l2")], "new/new.top1")
            checks_c.append((s, m, o, m >= o))
    out.append({"claim": "(c) MixBCT self-test ≥ L2",
                "holds": all(c[3] for c in checks_c) if checks_c else None,
                "evidence": "; ".join(f"{s[0]}/{s[1]}/d{s[2]}: mixbct {m:.4f} vs l2 {o:.4f}" for s, m, o, _ in checks_c)
                or "not measured"})  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- report


def _pm(value: tuple[float, float], seeds: int) -> str:
    mean, std = value
    if math.isnan(mean):
        return "–"
    return f"{mean:.4f} ± {std:.4f}" if seeds > 1 else f"{mean:.4f}"


def render(grid: Grid, rows: Sequence[Mapping[str, Any]], command: str, missing: int = 0) -> str:
    """docs/results.md: a table per setting, the regenerating command, and the claims computed from the numbers."""
    lines = [f"# Benchmark results: grid `{grid.name}`", "",
             f"Regenerate with:\n\n```bash\n{command}\n```", "",
             grid.description.strip(), "",
             "Cross-test = new/old (new queries vs the old gallery); self-test = new/new. Mean ± sample std over "
             "seeds where a setting has several. Criterion: BCT's new/old > old/old and new/new > old/old on the gate "
             "metrics (top1, TAR@FAR=1e-3), per seed; update gain and retention on top1 vs the paragon."]  # fmt: skip
    if missing:
        lines += ["", f"**Incomplete: {missing} cell(s) have no result yet.**"]
    cols = [f"{kind} {m}" for kind in ("self", "cross") for m in REPORT_METRICS]
    for setting in sorted({setting_of(r) for r in rows}, key=lambda s: (s != HEADLINE, str(s))):
        scenario, old, dim, ablation = setting
        group = sorted((r for r in rows if setting_of(r) == setting), key=lambda r: r["method"])
        title = f"{scenario}, old model {old} ({'weak' if old == 'softmax' else 'strong'}), d = {dim}"
        title += f", ablation {ablation}" if ablation != "-" else ""
        lines += ["", f"## {title}{' (headline)' if setting == HEADLINE else ''}", "",
                  "| method | seeds | " + " | ".join(cols) + " | criterion | update gain | retention |",
                  "|---|---:|" + "---:|" * len(cols) + ":---:|---:|---:|"]  # fmt: skip
        ref = group[0]
        lines.append("| old/old (reference) | " + str(ref["seeds"]) + " | "
                     + " | ".join(_pm(ref[f"old/old.{m}"], ref["seeds"]) for m in REPORT_METRICS) + " | "
                     + " | ".join(_pm(ref[f"old/old.{m}"], ref["seeds"]) for m in REPORT_METRICS) + " | | | |")  # fmt: skip
        for r in group:
            n = r["seeds"]
            verdict = ("pass" if r["passes"] == n else "FAIL") + f" ({r['passes']}/{n})"
            cells = [_pm(r[f"new/new.{m}"], n) for m in REPORT_METRICS] + [_pm(r[f"new/old.{m}"], n) for m in REPORT_METRICS]
            lines.append(f"| {r['method']} | {n} | " + " | ".join(cells) + f" | {verdict} | "
                         f"{_pm(r['update_gain.top1'], n)} | {_pm(r['retention.top1'], n)} |")  # fmt: skip
    lines += ["", "## Claims as found", "", "Computed from the tables above by `components.benchmark.claims`.", ""]
    for c in claims(rows):
        verdict = {True: "**holds**", False: "**does not hold**", None: "**not measured**"}[c["holds"]]
        lines.append(f"- {c['claim']}: {verdict}. {c['evidence']}")
    lines += ["", "Figures: `cross_by_method.png` (headline cross-test top1), `tradeoff.png` (self vs cross top1)."]
    return "\n".join(lines) + "\n"


def write_report(grid: Grid, rows: Sequence[Mapping[str, Any]], out: str | Path, command: str, missing: int = 0) -> dict[str, str]:
    out = Path(out)
    results = write_text(out / "results.md", render(grid, rows, command, missing))
    return {"results": str(results), **plots(rows, out)}


def plots(rows: Sequence[Mapping[str, Any]], out: Path) -> dict[str, str]:
    """cross_by_method.png (headline setting, error bars) and tradeoff.png (self vs cross, every setting)."""
    from components.plots import _figure

    plt = _figure()
    headline = [r for r in rows if setting_of(r) == HEADLINE] or [r for r in rows if r["ablation"] == "-"] or list(rows)
    shown = headline and setting_of(headline[0])
    headline = sorted((r for r in headline if setting_of(r) == shown), key=lambda r: r["method"])
    fig, ax = plt.subplots(figsize=(7, 4))
    if headline:
        x = range(len(headline))
        ax.bar(x, [r["new/old.top1"][0] for r in headline], yerr=[r["new/old.top1"][1] for r in headline], capsize=4)
        ax.axhline(headline[0]["old/old.top1"][0], color="k", linestyle="--", label="old/old")
        ax.set_xticks(list(x), [r["method"] for r in headline], rotation=30)
        ax.legend()
    ax.set_ylabel("cross-test top1 (new/old)")
    ax.set_title(f"Cross-test by method: {'/'.join(map(str, shown)) if shown else 'no results'}")
    cross = out / "cross_by_method.png"
    with atomic_path(cross, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for method in sorted({r["method"] for r in rows}):
        rs = [r for r in rows if r["method"] == method and r["ablation"] == "-"]
        ax.errorbar([r["new/old.top1"][0] for r in rs], [r["new/new.top1"][0] for r in rs],
                    xerr=[r["new/old.top1"][1] for r in rs], yerr=[r["new/new.top1"][1] for r in rs],
                    fmt="o", label=method, capsize=3)  # fmt: skip
    ax.set_xlabel("cross-test top1 (new/old)")
    ax.set_ylabel("self-test top1 (new/new)")
    ax.set_title("Self-test vs cross-test per method (one point per setting)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    tradeoff = out / "tradeoff.png"
    with atomic_path(tradeoff, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return {"cross_by_method": str(cross), "tradeoff": str(tradeoff)}
