"""The upgrade's stage table: the one definition of the pipeline.

Each stage names its function `(cfg, paths) -> summary`, the params it reads, the stages whose outputs it reads
and what it writes. Everything that runs the pipeline iterates this table: the Prefect flows (`flows/upgrade.py`
as tasks, `flows/benchmark.py` per shared piece), `mixbct stage NAME` (what DVC calls) and `benchmarks/run.py`.
`dvc.yaml` is generated from it (`mixbct dvc-yaml`; a fast test fails when they differ), with each stage's code
dependencies found by reading the code it runs (`code_deps`): editing a function a stage calls makes `dvc status`
name that stage and the ones downstream.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from components import keys
from components.config import Config
from components.paths import Paths

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config, Paths], dict[str, Any]]
    calls: tuple[str, ...]  # the functions of components/stages.py it runs (their code is its code dependency)
    params: tuple[str, ...]  # what it reads from params.yaml: whole sections, or dotted keys from components.keys
    after: tuple[str, ...]  # stages whose outputs it reads
    outs: tuple[str, ...]  # what it writes, relative to the work folder
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    dynamic: tuple[str, ...] = ()  # modules it loads by name at run time (e.g. the compatibility methods)
    retries: int = 0  # how often a flow may retry a transient failure (bad input is never retried)
    when: Callable[[Config], bool] = lambda cfg: True  # whether the upgrade flow runs it for this config


def _stages() -> Any:
    from components import stages

    return stages


def _prepare(cfg: Config, paths: Paths) -> dict[str, Any]:
    _stages().check_inputs(cfg, paths)  # batch sizes, the user's old model and gallery: before anything is written
    return _stages().prepare(cfg.data, paths, workers=cfg.runtime.workers)


def _legacy(cfg: Config, paths: Paths) -> dict[str, Any]:
    return _stages().legacy(
        cfg.legacy, cfg.old, cfg.data.image_size, paths, cfg.runtime.threads, tolerance=cfg.evaluate.onnx_tolerance,
        data=cfg.data,
    )  # fmt: skip


def _extract(cfg: Config, paths: Paths) -> dict[str, Any]:
    return _stages().extract_old(cfg.extract, cfg.train.embedding_dim, cfg.data.image_size, paths, cfg.runtime.threads)


def _train(role: str) -> Callable[[Config, Paths], dict[str, Any]]:
    def run(cfg: Config, paths: Paths) -> dict[str, Any]:
        return _stages().train(cfg.train, cfg.data.image_size, paths, role, threads=cfg.runtime.threads)

    return run


def _evaluate(cfg: Config, paths: Paths) -> dict[str, Any]:
    return _stages().evaluate(cfg.evaluate, paths, cfg.runtime.threads)


def _register(cfg: Config, paths: Paths) -> dict[str, Any]:
    from components.io import write_json

    stages = _stages()
    # the same inputs key as the flow's "nothing to upgrade" check, on every path (flow, DVC, benchmark script)
    hashes = stages.input_hashes(cfg)
    fingerprint = {**stages.fingerprint(cfg, hashes["data"], paths), "upgrade_key": hashes["upgrade_key"]}
    out = stages.register(cfg, paths, fingerprint)
    write_json(paths.registration, out)
    return out


_PARAGON = tuple(f"train.{f}" for f in keys.train_fields("paragon")) + ("data.image_size",)
_NEW = tuple(f"train.{f}" for f in keys.train_fields("new")) + ("data.image_size",)
# build_method(name) imports every method file (components.losses._load_all): each can be the one trained.
_METHODS = tuple(f"components.losses.{p.stem}" for p in sorted((ROOT / "components" / "losses").glob("*.py")) if p.stem != "__init__")
_ROC = tuple(f"eval/roc_{q}_{g}.csv" for q, g in (("old", "old"), ("new", "old"), ("new", "new"), ("paragon", "old"), ("paragon", "paragon")))

STAGES: tuple[Stage, ...] = (
    Stage("prepare", _prepare, ("check_inputs", "prepare"), ("data",), (), ("dataset", "reports/data_validation.md"),
          retries=1),
    Stage("legacy", _legacy, ("legacy",), ("legacy", "old", "data.image_size", "data.channels", "evaluate.onnx_tolerance"), ("prepare",),
          ("legacy",)),
    Stage("extract", _extract, ("extract_old",), ("extract", "train.embedding_dim", "data.image_size"),
          ("prepare", "legacy"), ("old_features", "reports/legacy_gallery_validation.md")),
    Stage("train", _train("new"), ("train",), _NEW, ("prepare", "legacy", "extract"), ("new",), dynamic=_METHODS),
    Stage("paragon", _train("paragon"), ("train",), _PARAGON, ("prepare",), ("paragon",), dynamic=_METHODS,
          when=lambda cfg: cfg.train.paragon and cfg.train.method != "none"),
    Stage("evaluate", _evaluate, ("evaluate",), ("evaluate",), ("prepare", "legacy", "train", "paragon"),
          ("eval/table.md", "eval/roc.png", "eval/training.png", "eval/backfill.png", "eval/backfill.json",
           "reports/new_gallery_validation.md"),
          metrics=("eval/metrics.json",), plots=_ROC),
    Stage("register", _register, ("input_hashes", "fingerprint", "register"), ("registry", "evaluate"),
          ("prepare", "legacy", "train", "evaluate"), ("registration.json",), retries=2),
)  # fmt: skip
BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    from components.errors import UpgradeError

    if name not in BY_NAME:
        raise UpgradeError(f"unknown stage {name!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def run(name: str, cfg: Config, paths: Paths) -> dict[str, Any]:
    """Run one stage (threads set from `runtime`): the only caller of the stage functions."""
    _stages().set_threads(cfg.runtime.threads)
    from components.data.store import set_loader_workers
    from components.device import place, set_placement

    set_loader_workers(cfg.runtime.loader_workers, cfg.runtime.workers)
    set_placement(place(cfg.runtime.device, cfg.runtime.precision, cfg.runtime.channels_last, cfg.runtime.compile))
    from components.distributed import Launch, set_launch

    rt = cfg.runtime
    set_launch(Launch(rt.nproc_per_node, rt.dist_backend, rt.sync_batchnorm, tuple(rt.torchrun_args)))
    return stage(name).run(cfg, paths)


# ------------------------------------------------------------------------------------------- code deps


@cache
def _module_file(module: str) -> Path | None:
    """components.x.y -> components/x/y.py or components/x/y/__init__.py (None outside the project)."""
    if not module.startswith("components"):
        return None
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(nodes: list[ast.AST], package: str) -> set[str]:
    """components modules imported anywhere under `nodes` (module level or inside functions)."""
    found: set[str] = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if _module_file(m) is not None}


# Modules whose imports inside functions are not followed: config's validators import the method and backbone
# registries only to check names; the method registry loads every method file by name (Stage.dynamic says which
# stages do).
_NAMES_ONLY = frozenset({"components.config", "components.losses"})


@cache
def _module_imports(module: str) -> frozenset[str]:
    """What `module`'s code may run: every components module it imports, at module level or inside a function."""
    path = _module_file(module)
    assert path is not None
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    if module in _NAMES_ONLY:
        return frozenset(_imports([n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], package))
    return frozenset(_imports([tree], package))


# Read function by function instead (see _function_imports): their functions import what each stage needs.
_BY_FUNCTION = frozenset({"components.stages", "components.pipeline"})


def _closure(modules: set[str]) -> set[str]:
    todo, seen = list(modules), set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if m not in _BY_FUNCTION:
            todo.extend(_module_imports(m) - seen)
        parent = m.rsplit(".", 1)[0]  # importing a.b runs a/__init__.py
        if parent != m and _module_file(parent) is not None:
            todo.append(parent)
    return seen


def _function_imports(functions: tuple[str, ...]) -> set[str]:
    """The imports of these components/stages.py functions and of the module's own functions they call."""
    tree = ast.parse((ROOT / "components" / "stages.py").read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    module_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    todo, seen = list(functions), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in defs:
            raise KeyError(f"components/stages.py has no function {name!r} (components.pipeline.STAGES)")
        seen.add(name)
        calls = {c.func.id for c in ast.walk(defs[name]) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        todo.extend(sorted((calls & set(defs)) - seen))
    return _imports([*module_level, *(defs[n] for n in seen)], "components")


def code_deps(s: Stage) -> list[str]:
    """Every project file whose code the stage runs: the table itself, its stage functions (with the functions they
    call) and every components module those import, transitively."""
    tree = ast.parse((ROOT / "components" / "pipeline.py").read_text())
    runners = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == s.run.__qualname__.split(".")[0]]
    own = _imports([n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)] + runners, "components")
    modules = _closure(_function_imports(s.calls) | own | {"components.stages"} | set(s.dynamic))
    files = {_module_file(m) for m in modules} | {ROOT / "components" / "pipeline.py"}
    return sorted(f.relative_to(ROOT).as_posix() for f in files if f is not None)


# ------------------------------------------------------------------------------------------- dvc.yaml

HEADER = """\
# Generated from components/pipeline.py by `mixbct dvc-yaml`: do not edit by hand (a test compares them).
# Each stage runs the same function as the Prefect task of the same name; its deps are the stages it reads and
# every file of the code it runs, its params what components/keys.py says it depends on.
# `dvc repro` re-runs only what changed; `dvc metrics show`, `dvc plots show` read the evaluation.
# Every output is cached: artifacts/ is git-ignored, so only the DVC cache and `dvc push` / `dvc pull` carry them.
"""


def dvc_stages(workdir: str = "artifacts") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in STAGES:
        deps = ["data"] if s.name == "prepare" else []
        for before in s.after:
            deps += [f"{workdir}/{o}" for o in BY_NAME[before].outs + BY_NAME[before].metrics if not o.startswith("reports/")]
        entry: dict[str, Any] = {"cmd": f"mixbct stage {s.name}", "deps": [*deps, *code_deps(s)], "params": list(s.params)}
        if s.metrics:
            entry["metrics"] = [f"{workdir}/{m}" for m in s.metrics]
        entry["outs"] = [f"{workdir}/{o}" for o in s.outs]
        if s.plots:
            entry["plots"] = [f"{workdir}/{p}" for p in s.plots]
        out[s.name] = entry
    return out


def dvc_yaml(workdir: str = "artifacts") -> str:
    plots = [
        {"roc": {"template": "simple", "x": "fpr", "y": {f"{workdir}/{p}": "tpr" for p in _ROC},
                 "x_label": "false accept rate", "y_label": "true accept rate"}},
        {"training_loss": {"template": "linear", "x": "epoch",
                           "y": {f"{workdir}/{r}/history.csv": "loss" for r in ("legacy", "new", "paragon")}}},
    ]  # fmt: skip
    body = yaml.safe_dump({"stages": dvc_stages(workdir), "plots": plots}, sort_keys=False, width=120)
    return HEADER + body
