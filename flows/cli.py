"""`mixbct`: the command line for the user's tasks (upgrade, one stage, evaluate two models, show the table)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from components.errors import UpgradeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True, soft_wrap=True)  # never break a file name across lines

OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    # MLflow's default (7 retries, backoff 2) takes minutes to report a tracking server that is down; the
    # flow's own task retries come on top of these.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    # The components' own log lines (e.g. "resuming from checkpoint ...") go through Prefect's handlers: the
    # console and the flow run's logs in the UI.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "components",
    # ... and outside a flow run (DVC stages, plain calls) they stay console-only instead of warning.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read")]
WorkdirOpt = Annotated[Path, typer.Option("--workdir", "-w", help="folder for stage outputs")]
SetOpt = Annotated[list[str], typer.Option("--set", "-S", help="override a parameter, e.g. -S train.method=none")]


def _environment() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))


def _overrides(items: list[str] | None, **named: Any) -> dict[str, Any]:
    from components.config import parse_override

    out = dict(parse_override(s) for s in items or [])
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def foreign_check(workdir: Path) -> None:
    """Refuse a --workdir that holds the user's own files, before anything (the lock file included) is written."""
    from components.io import foreign_entries
    from components.paths import LAYOUT

    foreign_entries(workdir, LAYOUT, fail=True)


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(err))}")
    report = getattr(err, "report", None)
    if report:
        console.print(f"report: {escape(str(report))}")
    raise typer.Exit(code=1)


@app.command()
def upgrade(
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = Path("artifacts"),
    set_: SetOpt = None,  # type: ignore[assignment]
    data_root: Annotated[str | None, typer.Option(help="raw data folder (data.root)")] = None,
    source: Annotated[str | None, typer.Option(help="kanjivg or imagefolder (data.source)")] = None,
    old_model: Annotated[str | None, typer.Option(help="existing old model, .onnx or .pt (old.model)")] = None,
    gallery: Annotated[str | None, typer.Option(help="existing gallery embeddings: .npz (embeddings + paths/ids) or .npy in manifest order (old.gallery)")] = None,
    force: Annotated[bool, typer.Option(help="run even if a registered version has the same inputs")] = False,
) -> None:
    """Run the upgrade flow: validate, extract old features, train, evaluate, register if compatible."""
    _environment()
    try:
        from components.config import load_config

        overrides = _overrides(set_, **{"data.root": data_root, "data.source": source, "old.model": old_model, "old.gallery": gallery})
        load_config(params, overrides)  # fail on bad params before Prefect starts
        foreign_check(workdir)  # and on a --workdir full of the user's own files
        from flows.upgrade import upgrade as upgrade_flow

        result = upgrade_flow(params=str(params), workdir=str(workdir), overrides=overrides, force=force)
    except UpgradeError as err:
        _fail(err)
    _summary(result)


def _summary(result: dict[str, Any]) -> None:
    out = Console()
    out.print()
    if result["status"] == "nothing-to-upgrade":
        e = result["existing"]
        out.print(f"[bold]nothing to upgrade[/]: {e['model_name']} version {e['version']} (run {e['run_id']}) was built "
                  "from the same params, data and old model; use --force to train again")
        return
    reg = result["register"]
    if reg.get("registered"):
        out.print(f"[bold green]compatible[/]: registered {reg['model_name']} version {reg['version']} as @{reg['alias']}")
    else:
        out.print(f"[bold yellow]not registered[/]: {reg.get('reason')}")
    out.print(f"MLflow run: {reg['run_id']} (experiment {reg['experiment_id']}); browse with `make mlflow-ui`")
    out.print(f"table: {result['evaluate']['table']}")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="a stage of components/pipeline.py: prepare | legacy | extract | train | paragon | evaluate | register")],
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = Path("artifacts"),
    set_: SetOpt = None,  # type: ignore[assignment]
) -> None:
    """Run one stage directly, without Prefect (what dvc.yaml calls)."""
    _environment()
    from components import pipeline
    from components.config import load_config
    from components.io import claim_workdir, exclusive, sweep_stale
    from components.paths import LAYOUT, Paths

    try:
        cfg = load_config(params, _overrides(set_))
        pipeline.stage(name)  # an unknown name fails here, listing the known ones
        foreign_check(workdir)
        paths = Paths(workdir)
        with exclusive(paths.root, what="a run"):  # never beside a running upgrade or another stage
            claim_workdir(paths.root, LAYOUT)
            sweep_stale(paths.root)
            result = pipeline.run(name, cfg, paths)
    except UpgradeError as err:
        _fail(err)
    if name == "evaluate":
        Console().print((Path(workdir) / "eval" / "table.md").read_text())
    console.print_json(json.dumps(result, default=str))


def _print_comparison(result: Any) -> None:
    """The table on stdout: as wide as it needs when piped (a file has no width), folded to fit a terminal."""
    rendered = result.table.rich_table(result.verdict)
    out = Console()
    if not out.is_terminal:
        out = Console(width=max(out.width, Console(width=1 << 16).measure(rendered).maximum))
    out.print(rendered)
    gate = ", ".join(result.verdict.gate_metrics)
    out.print(f"gate ({gate}): {'PASSED' if result.verdict.passed else 'FAILED'}", markup=False, highlight=False)
    for line in result.verdict.reasons:
        out.print(f"- {line}", markup=False, highlight=False)
    for line in result.notes:
        out.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def evaluate(
    query_model: Annotated[Path, typer.Option(help="model embedding the queries (.onnx or .pt), e.g. the new one")],
    gallery_model: Annotated[Path, typer.Option(help="model that embedded the gallery (.onnx or .pt), e.g. the old one")],
    query_dir: Annotated[Path, typer.Option(help="ImageFolder of query images: root/<identity>/<image>")],
    gallery_dir: Annotated[Path, typer.Option(help="ImageFolder of gallery images: root/<identity>/<image>")],
    query_name: Annotated[str, typer.Option(help="name of the query model in rows and JSON keys")] = "new",
    gallery_name: Annotated[str, typer.Option(help="name of the gallery model in rows and JSON keys")] = "old",
    paragon: Annotated[Path | None, typer.Option(help="optional third model trained without compatibility: adds "
                                                      "its rows, update gain and retention")] = None,  # fmt: skip
    paragon_name: Annotated[str, typer.Option(help="name of the paragon in rows and JSON keys")] = "paragon",
    image_size: Annotated[int | None, typer.Option(help="resize images to this size (default: the models' own input "
                                                        "size; needed only when all accept any size)")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print the results as JSON instead of the table")] = False,
    output: Annotated[Path | None, typer.Option(help="also write the results as JSON to this file")] = None,
    threads: Annotated[int, typer.Option(help="torch/faiss/onnxruntime threads")] = 2,
) -> None:
    """Compare models on your own query/gallery folders: old/old, new/old, new/new (+ paragon rows), the criterion."""
    _environment()
    from components.compare import ModelSpec, compare
    from components.io import write_json
    from components.stages import set_threads

    try:
        set_threads(threads)
        result = compare(
            ModelSpec("query", query_name, query_model, "--query-name"),
            ModelSpec("gallery", gallery_name, gallery_model, "--gallery-name"),
            query_dir,
            gallery_dir,
            paragon=None if paragon is None else ModelSpec("paragon", paragon_name, paragon, "--paragon-name"),
            image_size=image_size,
            threads=threads,
        )
        if output is not None:
            try:
                write_json(output, result.to_dict())
            except OSError as err:
                raise UpgradeError(f"{output}: cannot write the results ({err.strerror or err})") from err
    except (UpgradeError, ValueError) as err:
        _fail(err)
    if json_:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
    else:
        _print_comparison(result)


@app.command()
def table(workdir: WorkdirOpt = Path("artifacts")) -> None:
    """Print the comparison table of the last evaluation in WORKDIR."""
    path = workdir / "eval" / "table.md"
    if not path.is_file():
        _fail(UpgradeError(f"{path}: no evaluation yet (run `mixbct upgrade` or `dvc repro`)"))
    Console().print(path.read_text())


@app.command()
def promote(
    version: Annotated[str | None, typer.Argument(help="version to promote (default: the current @challenger)")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Move @champion to a version whose gate passed and that serves the champion's gallery."""
    _environment()
    from components import registry
    from components.config import load_config

    try:
        out = registry.promote(load_config(params).registry, version)
    except UpgradeError as err:
        _fail(err)
    Console().print(f"{out['model_name']}: @champion -> version {out['champion']} (was {out['previous']})")


@app.command()
def benchmark(
    grid: Annotated[str, typer.Option(help="grid name in benchmarks/grid.yaml (quick, full) or a grid .yaml path")] = "quick",
    params: ParamsOpt = Path("params.yaml"),
    workdir: WorkdirOpt = Path("artifacts/benchmark"),
    report: Annotated[Path, typer.Option(help="folder for results.md and the figures")] = Path("docs"),
) -> None:
    """Run the paper's comparison over a grid (resumable), write docs/results.md and log to MLflow."""
    _environment()
    try:
        from components.benchmark import load_grid, plan

        plan(load_grid(grid), params, workdir)  # fail on a bad grid or override before Prefect starts
        from flows.benchmark import benchmark as benchmark_flow

        result = benchmark_flow(grid=grid, params=str(params), workdir=str(workdir), report=str(report))
    except UpgradeError as err:
        _fail(err)
    out = Console()
    out.print(f"grid {result['grid']}: {result['cells']} cells, {len(result['ran'])} run now")
    out.print(f"report: {result['report']['results']}; MLflow parent run {result['mlflow']['run_id']}")


@app.command()
def rollback(params: ParamsOpt = Path("params.yaml")) -> None:
    """Move @champion back to the version it replaced."""
    _environment()
    from components import registry
    from components.config import load_config

    try:
        out = registry.rollback(load_config(params).registry)
    except UpgradeError as err:
        _fail(err)
    Console().print(f"{out['model_name']}: @champion -> version {out['champion']} (rolled back from {out['rolled_back_from']})")


@app.command("dvc-yaml")
def dvc_yaml(
    check: Annotated[bool, typer.Option(help="only compare: exit 1 if dvc.yaml differs from the stage table")] = False,
    path: Annotated[Path, typer.Option(help="the dvc.yaml to write or check")] = Path("dvc.yaml"),
) -> None:
    """Write dvc.yaml from the stage table (components/pipeline.py): deps = the code each stage runs."""
    from components.io import write_text
    from components.pipeline import dvc_yaml as generate

    text = generate()
    if check:
        if not path.is_file() or path.read_text() != text:
            _fail(UpgradeError(f"{path}: differs from components/pipeline.py; run `mixbct dvc-yaml` to regenerate it"))
        console.print(f"{path}: matches the stage table")
        return
    write_text(path, text)
    console.print(f"{path}: written from the stage table ({text.count('cmd:')} stages)")


@app.command()
def doctor(params: ParamsOpt = Path("params.yaml")) -> None:
    """Find what killed runs left in the MLflow store: delete incomplete versions, mark dead RUNNING runs FAILED."""
    _environment()
    from components import registry
    from components.config import load_config

    try:
        out = registry.doctor(load_config(params).registry)
    except UpgradeError as err:
        _fail(err)
    con = Console()
    for label in out["deleted_versions"]:
        con.print(f"deleted incomplete {label}")
    for run_id in out["failed_runs"]:
        con.print(f"marked run {run_id} FAILED (its process had died)")
    for note in out["skipped"]:
        con.print(f"left: {note}")
    con.print(f"{out['model_name']}: complete versions {out['complete_versions'] or 'none'}, aliases "
              f"{out['aliases'] or 'none'}, incomplete {out['incomplete_versions'] or 'none'}")


def main() -> None:
    from flows.interrupt import install

    # Before app() runs, so that Ctrl-C never becomes click's "Aborted!" (exit 1): one line, exit 130/143.
    install()
    app()


if __name__ == "__main__":
    main()
