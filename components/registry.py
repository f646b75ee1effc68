"""MLflow tracking and the conditional registration of a compatible model (the only module importing MLflow).

Every upgrade becomes one MLflow run: params, the resolved config, per-epoch training curves, the cross-model
table and the validation reports. Only when the gate's decision (components.gate, taken by `stages.register`)
says so is the new model's ONNX export registered as a new version with alias `challenger`; otherwise the run is
tagged with the reasons and no version is created. This module records; it decides nothing and runs no model.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from components.config import Config, RegisterConfig
from components.errors import UpgradeError
from components.gate import Decision
from components.paths import Paths

CHALLENGER, CHAMPION = "challenger", "champion"
log = logging.getLogger(__name__)


def metric_key(name: str) -> str:
    """MLflow metric names allow [A-Za-z0-9_-. /]: 'new/old.tar@far=1e-3' -> 'new/old.tar_far_1e-3'."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name).replace("__", "_")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def evaluation_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """eval/metrics.json as MLflow metrics: every pair's metric of every evaluation set (the test set unprefixed,
    others as `shift.new/old.top1`), the bootstrap interval bounds (`ci.new/old - old/old.top1.lo`), negative flips
    (`flips.old/old -> new/old.nf_share`), each backfill curve's AUC and points (`backfill.random.auc.top1`), and
    with an approximate evaluate.index its recall@1 against exact search and throughputs (`new/old.index.recall@1`)."""
    out: dict[str, float] = {}
    sets = {"": metrics, **{f"{name}.": record for name, record in (metrics.get("sets") or {}).items()}}
    for prefix, record in sets.items():
        for pair, values in record.get("pairs", {}).items():
            out.update({f"{prefix}{pair}.{m}": v for m, v in values.items() if _finite(v)})
        boot = record.get("bootstrap") or {}
        for group, label in (("differences", "ci"), ("intervals", "ci"), ("negative_flips", "flips")):
            for row, cells in (boot.get(group) or {}).items():
                for m, iv in cells.items():
                    for bound in ("lo", "hi") if label == "ci" else ("point", "lo", "hi"):
                        if _finite(iv.get(bound)):
                            key = f"{prefix}{label}.{row}.{m}" + ("" if bound == "point" else f".{bound}")
                            out[key] = float(iv[bound])
    for order, curve in (metrics.get("backfill") or {}).items():
        for m, v in (curve.get("auc") or {}).items():
            if _finite(v):
                out[f"backfill.{order}.auc.{m}"] = float(v)
    for name, record in (metrics.get("face") or {}).items():  # .bin verification sets, the IJB-C-style protocol
        for pair, values in record.get("pairs", {}).items():
            out.update({f"face.{name}.{pair}.{m}": float(v) for m, v in values.items() if _finite(v)})
    for pair, values in ((metrics.get("index") or {}).get("pairs") or {}).items():  # an approximate evaluate.index
        out.update({f"{pair}.{m}": float(v) for m, v in values.items() if _finite(v)})  # new/old.index.recall@1
    return {metric_key(k): v for k, v in out.items()}


def evaluation_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """What a reviewer reads on a version without opening the run: the gate rule, each difference's interval,
    negative flips, the shifted sets' verdicts and the backfill AUCs and dips."""
    tags: dict[str, str] = {}
    crit = metrics.get("criterion") or {}
    tags["gate.rule"] = crit.get("require", "point")
    for side, cells in (crit.get("intervals") or {}).items():
        for m, (est, lo, hi) in cells.items():
            if all(_finite(v) for v in (est, lo, hi)):
                tags[f"ci.{side}.{m}"] = f"{100 * est:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] points"
    boot = metrics.get("bootstrap") or {}
    if boot:
        tags["ci.level"] = str(boot.get("level"))
        tags["ci.resamples"] = str(boot.get("n_resamples"))
    for row, cells in (boot.get("negative_flips") or {}).items():
        iv = cells.get("nf_share") or {}
        if all(_finite(iv.get(k)) for k in ("point", "lo", "hi")):
            tags[f"flips.{row}"] = f"{iv['point']:.4f} [{iv['lo']:.4f}, {iv['hi']:.4f}]"
    for name, record in (metrics.get("sets") or {}).items():
        c = record.get("criterion") or {}
        if name.startswith("validation") or not c:  # choices are made there; versions carry the test-side sets
            continue
        tags[f"{name}.passed"] = str(c.get("passed"))
        for m, ok in (c.get("cross") or {}).items():
            tags[f"{name}.cross.{m}"] = str(ok)
        pairs = record.get("pairs") or {}
        for pair in ("old/old", "new/old", "new/new"):
            v = (pairs.get(pair) or {}).get("top1")
            if _finite(v):
                tags[f"{name}.{pair}.top1"] = f"{v:.4f}"
    for order, curve in (metrics.get("backfill") or {}).items():
        for m, v in (curve.get("auc") or {}).items():
            if _finite(v):
                tags[f"backfill.{order}.auc.{m}"] = f"{v:.4f}"
        tags[f"backfill.{order}.dips"] = str(curve.get("dips"))
    return tags


def run_url(cfg: RegisterConfig, experiment_id: str, run_id: str) -> str:
    """Where a reviewer finds the run: the tracking server's page, or the local `mlflow ui` (make mlflow-ui)."""
    base = cfg.tracking_uri if cfg.tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# A URI scheme (s3://, file:///, mlflow-artifacts:/ of a server proxying artifacts); 2+ letters, so not "C:".
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def connect(cfg: RegisterConfig) -> str:
    """Point MLflow at the configured store; return the experiment id (created with an explicit artifact root).

    A store that cannot be reached (a tracking server down, a wrong URI) fails here, before anything is logged.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(cfg.tracking_uri)
    try:
        exp = mlflow.get_experiment_by_name(cfg.experiment)
    except MlflowException as err:
        raise UpgradeError(
            f"registry.tracking_uri {cfg.tracking_uri}: cannot use the MLflow tracking store: {err}"
        ) from err
    if exp is not None:
        return exp.experiment_id
    location = cfg.artifact_root
    if not _URI.match(location):  # a local folder: stored as an absolute file URI
        location = Path(location).resolve().as_uri()
    return mlflow.create_experiment(cfg.experiment, artifact_location=location)


def _log_history(prefix: str, history_file: Path) -> None:
    import mlflow

    if not history_file.is_file():
        return
    for record in json.loads(history_file.read_text()):
        step = int(record["epoch"])
        metrics = {metric_key(f"{prefix}.{k}"): float(v) for k, v in record.items() if k != "epoch"}
        mlflow.log_metrics(metrics, step=step)


def _onnx_signature(model: Any) -> tuple[Any, np.ndarray]:
    """Signature and input example from the ONNX graph's own input/output shapes (dynamic dims -> batch of 2):
    what is registered describes itself, without running it here."""
    from mlflow.models import infer_signature

    def zeros(value: Any) -> np.ndarray:
        dims = [d.dim_value if d.HasField("dim_value") else 2 for d in value.type.tensor_type.shape.dim]
        return np.zeros(dims, dtype=np.float32)

    x = zeros(model.graph.input[0])
    return infer_signature(x, zeros(model.graph.output[0])), x


# A version is complete, and visible to `promote` and to the "nothing to upgrade" check, only once this tag is
# written: the registration's last call, after its tags, description and alias. A version without it was left by a
# registration that died half-way (kill -9, power loss) and is removed by `recover` (the next registration or
# `mixbct doctor`).
COMPLETE_TAG, COMPLETE = "registration", "complete"
# The registering process, recorded on every run this module starts, so that a run (or version) left RUNNING by a
# killed process can be told apart from one that is still being written.
PROCESS_TAGS = ("mixbct.host", "mixbct.pid", "mixbct.pid_started")


def _process_tags() -> dict[str, str]:
    import socket

    import psutil

    me = psutil.Process()
    return {"mixbct.host": socket.gethostname(), "mixbct.pid": str(me.pid), "mixbct.pid_started": f"{me.create_time():.3f}"}


def _writer_state(tags: dict[str, str]) -> str:
    """"alive", "dead" or "unknown" (another host, or a run started before these tags existed)."""
    import socket

    import psutil

    if not all(k in tags for k in PROCESS_TAGS) or tags["mixbct.host"] != socket.gethostname():
        return "unknown"
    try:
        proc = psutil.Process(int(tags["mixbct.pid"]))
        same = abs(proc.create_time() - float(tags["mixbct.pid_started"])) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return "dead"
    return "alive" if same else "dead"  # a reused pid is another process: the writer is gone


def is_complete(version: Any) -> bool:
    return version.tags.get(COMPLETE_TAG) == COMPLETE


def track_and_register(
    cfg: Config,
    paths: Paths,
    fingerprint: dict[str, str],
    decision: Decision,
    legacy: dict[str, Any],
    extra_metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Log the upgrade as one MLflow run; register the new model only if `decision.register`.

    `fingerprint` holds content hashes (data, old model, gallery, params) recorded as tags, so a later run can
    tell whether anything changed; `legacy` is the legacy stage's info (the old model and gallery it checked
    against). What earlier registrations killed half-way left behind is cleaned up first.
    """
    import mlflow

    reg = cfg.registry
    experiment_id = connect(reg)
    recover(reg)
    metrics = json.loads((paths.eval / "metrics.json").read_text())
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"upgrade-{cfg.train.method}", tags=_process_tags()) as run:
        tags = _log_upgrade(cfg, paths, fingerprint, metrics, decision, extra_metrics)
        result: dict[str, Any] = {"run_id": run.info.run_id, "experiment_id": experiment_id, "passed": decision.compatible}
        if not decision.register:
            mlflow.set_tags({"registration": "refused", "registration.reason": decision.reason})
            result.update(registered=False, reason=decision.reason)
            return result
        version = _register_version(cfg, paths, fingerprint, tags, legacy, run.info.run_id)
        mlflow.set_tag("registration", f"{reg.model_name}/{version}")
        result.update(registered=True, model_name=reg.model_name, version=version, alias=CHALLENGER)
        return result


def _log_upgrade(
    cfg: Config,
    paths: Paths,
    fingerprint: dict[str, str],
    metrics: dict[str, Any],
    decision: Decision,
    extra_metrics: dict[str, float] | None,
) -> dict[str, str]:
    """Params, resolved config, curves, the table and the reports into the active run; returns its verdict tags."""
    import mlflow

    mlflow.log_params(cfg.flat())
    extra = dict(extra_metrics or {})
    if decision.onnx_parity is not None:
        extra["onnx.max_abs_diff"] = decision.onnx_parity
    if extra:
        mlflow.log_metrics(extra)
    mlflow.log_dict(cfg.as_dict(), "config/resolved_config.json")
    for role, folder in (("legacy", paths.legacy), ("new", paths.model_dir("new")), ("paragon", paths.model_dir("paragon"))):
        _log_history(f"train.{role}", folder / "history.json")
    mlflow.log_metrics(evaluation_metrics(metrics))
    mlflow.log_artifact(str(paths.eval / "table.md"), "compatibility")
    mlflow.log_artifact(str(paths.eval / "metrics.json"), "compatibility")
    for roc in sorted(paths.eval.glob("roc_*.csv")):
        mlflow.log_artifact(str(roc), "compatibility/roc")
    for figure in sorted(paths.eval.glob("*.png")):  # ROC curves, training curves
        mlflow.log_artifact(str(figure), "compatibility")
    for report in sorted(paths.reports.glob("*.md")):
        mlflow.log_artifact(str(report), "validation")
    tags = {metric_key(k): v for k, v in decision.tags.items()}
    tags.update({metric_key(k): v for k, v in evaluation_tags(metrics).items()})
    tags.update({f"hash.{k}": v for k, v in fingerprint.items()})
    mlflow.set_tags(tags)
    return tags


def _register_version(
    cfg: Config, paths: Paths, fingerprint: dict[str, str], tags: dict[str, str], old: dict[str, Any], run_id: str
) -> int:
    """ONNX export (checked against torch by the gate) -> a new version with every tag in one call -> description
    -> alias -> the `registration=complete` marker. Killed anywhere before the marker, the version stays invisible
    to readers."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    reg = cfg.registry
    model = onnx.load(str(paths.model_dir("new") / "model.onnx"))
    signature, example = _onnx_signature(model)
    info = mlflow.onnx.log_model(
        onnx_model=model,
        name="model",
        signature=signature,
        input_example=example,
        onnx_execution_providers=["CPUExecutionProvider"],
        pip_requirements=["onnx", "onnxruntime"],
    )
    from components.preprocess import METADATA_KEY

    feed = {prop.key: prop.value for prop in model.metadata_props}.get(METADATA_KEY)
    version_tags = {
        **tags,
        **({"preprocess": feed} if feed else {}),  # how to feed it: also inside the ONNX's metadata
        "run_id": run_id,
        "old_model_sha256": old["model_sha256"],
        "gallery_sha256": old["gallery_sha256"],
        **({"upgrade_key": fingerprint["upgrade_key"]} if "upgrade_key" in fingerprint else {}),
        **_process_tags(),
    }
    version = mlflow.register_model(info.model_uri, reg.model_name, tags=version_tags).version
    client = MlflowClient()
    description = (
        f"{cfg.train.method} upgrade ({cfg.train.arch}, d={cfg.train.embedding_dim}) compatible with old model "
        f"{old.get('source_model', 'legacy/' + old['model'])} (sha256 {old['model_sha256'][:12]}), checked "
        f"against gallery sha256 {old['gallery_sha256'][:12]}. Gate: {', '.join(cfg.evaluate.gate_metrics)} passed."
    )
    try:
        client.update_model_version(reg.model_name, version, description=description)
        client.set_registered_model_alias(reg.model_name, CHALLENGER, version)
        client.set_model_version_tag(reg.model_name, version, COMPLETE_TAG, COMPLETE)  # the commit point
    except Exception:
        # an error we can see: remove the version now rather than leave it to `recover`
        client.delete_model_version(reg.model_name, version)
        raise
    return int(version)


def recover(cfg: RegisterConfig) -> dict[str, list[str]]:
    """Clean up after registrations that died half-way; log and return what was done.

    - a version without the `registration=complete` marker whose registering process is gone is deleted (its
      aliases go with it);
    - a run still RUNNING whose process is gone (same host, pid dead or reused) is marked FAILED.
    Versions and runs of a live process, or of another host, are left alone and reported as skipped.
    """
    from mlflow import MlflowClient
    from mlflow.entities import RunStatus

    client = MlflowClient()
    done: dict[str, list[str]] = {"deleted_versions": [], "failed_runs": [], "skipped": []}
    for version in _all_versions(client, cfg.model_name):
        if is_complete(version):
            continue
        label = f"{cfg.model_name} version {version.version}"
        state = _writer_state(version.tags)
        if state == "dead":
            client.delete_model_version(cfg.model_name, version.version)
            log.warning("deleted incomplete %s (its registration was killed before it finished)", label)
            done["deleted_versions"].append(label)
        elif state == "alive":
            done["skipped"].append(f"{label}: being registered now (pid {version.tags['mixbct.pid']})")
        else:  # registered by hand, by an older version of this project or on another host: never deleted here
            done["skipped"].append(f"{label}: incomplete, not written by a registration on this host; left as it is")
    exp = _experiment(cfg)
    if exp is not None:
        for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
            state = _writer_state(run.data.tags)
            if state == "dead":
                client.set_tag(run.info.run_id, "mixbct.recovered", "its process died while the run was RUNNING")
                client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.FAILED))
                log.warning("marked run %s FAILED: its process (pid %s) died while it was RUNNING", run.info.run_id, run.data.tags["mixbct.pid"])
                done["failed_runs"].append(run.info.run_id)
            elif state == "unknown":
                done["skipped"].append(f"run {run.info.run_id}: RUNNING, started by another host or an older version")
    return done


def _all_versions(client: Any, name: str) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []


def _experiment(cfg: RegisterConfig) -> Any | None:
    import mlflow

    return mlflow.get_experiment_by_name(cfg.experiment)


def find_registered(cfg: RegisterConfig, key: str) -> dict[str, Any] | None:
    """The newest complete registered version whose inputs hash to `key` (tag `upgrade_key`), if any."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    connect(cfg)
    try:
        found = MlflowClient().search_model_versions(
            f"name='{cfg.model_name}' and tags.upgrade_key='{key}' and tags.{COMPLETE_TAG}='{COMPLETE}'"
        )
    except MlflowException:
        return None  # no registered model yet
    if not found:
        return None
    newest = max(found, key=lambda v: int(v.version))
    return {"model_name": cfg.model_name, "version": int(newest.version), "run_id": newest.run_id}


def connect_existing(cfg: RegisterConfig, need_model: bool = True) -> None:
    """Point MLflow at a store that must already hold `cfg.model_name`; create nothing (no store, no experiment).

    What `promote` and `rollback` use: a typo in the URI or the model name is an error naming it, never a new
    empty store.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = cfg.tracking_uri
    local = None
    if uri.startswith("sqlite:///"):
        local = Path(uri[len("sqlite:///"):])
    elif uri.startswith("file:") or not _URI.match(uri):
        local = Path(uri.removeprefix("file://").removeprefix("file:"))
    if local is not None and not local.exists():
        raise UpgradeError(f"registry.tracking_uri {uri}: no MLflow store at {local} (nothing was ever registered there)")
    mlflow.set_tracking_uri(uri)
    if not need_model:
        return
    try:
        MlflowClient().get_registered_model(cfg.model_name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UpgradeError(f"registry.model_name {cfg.model_name!r}: no such registered model in {uri}") from err
        raise UpgradeError(f"registry.tracking_uri {uri}: cannot use the MLflow tracking store: {err}") from err


def _version_or_fail(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        raise UpgradeError(f"registered model {name!r} has no version {version}") from err


def _complete_or_fail(version: Any, name: str) -> Any:
    if not is_complete(version):
        raise UpgradeError(
            f"{name} version {version.version} is incomplete: its registration did not finish (no "
            f"`{COMPLETE_TAG}={COMPLETE}` tag); refusing it. `mixbct doctor` removes what killed registrations left"
        )
    return version


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(cfg: RegisterConfig, version: str | None = None) -> dict[str, Any]:
    """Move `champion` to `version` (default: the current `challenger`).

    Refused when the version does not exist, its registration is incomplete, its gate did not pass, or it was
    checked against a different gallery than the current champion serves (it would not be compatible with what
    production searches).
    """
    from mlflow import MlflowClient

    connect_existing(cfg)
    client = MlflowClient()
    if version is None:
        challenger = _alias_version(client, cfg.model_name, CHALLENGER)
        if challenger is None:
            raise UpgradeError(f"registered model {cfg.model_name!r} has no @{CHALLENGER} to promote")
        version = str(challenger.version)
    candidate = _complete_or_fail(_version_or_fail(client, cfg.model_name, version), cfg.model_name)
    if candidate.tags.get("gate.passed") != "True":
        raise UpgradeError(f"{cfg.model_name} version {version}: its compatibility gate did not pass; refusing to promote")
    champion = _alias_version(client, cfg.model_name, CHAMPION)
    if champion is not None:
        if str(champion.version) == str(version):
            raise UpgradeError(f"{cfg.model_name} version {version} is already @{CHAMPION}")
        if champion.tags.get("gallery_sha256") != candidate.tags.get("gallery_sha256"):
            raise UpgradeError(
                f"{cfg.model_name} version {version} was checked against gallery "
                f"{candidate.tags.get('gallery_sha256', '?')[:12]}, but @{CHAMPION} (version {champion.version}) serves "
                f"gallery {champion.tags.get('gallery_sha256', '?')[:12]}; refusing to promote"
            )
        client.set_model_version_tag(cfg.model_name, version, "previous_champion", str(champion.version))
    client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
    return {"model_name": cfg.model_name, "champion": int(version), "previous": None if champion is None else int(champion.version)}


def rollback(cfg: RegisterConfig) -> dict[str, Any]:
    """Move `champion` back to the version it replaced."""
    from mlflow import MlflowClient

    connect_existing(cfg)
    client = MlflowClient()
    champion = _alias_version(client, cfg.model_name, CHAMPION)
    if champion is None:
        raise UpgradeError(f"registered model {cfg.model_name!r} has no @{CHAMPION} to roll back")
    previous = champion.tags.get("previous_champion")
    if not previous:
        raise UpgradeError(f"{cfg.model_name} version {champion.version} is the first @{CHAMPION}; nothing to roll back to")
    _complete_or_fail(_version_or_fail(client, cfg.model_name, previous), cfg.model_name)
    client.set_registered_model_alias(cfg.model_name, CHAMPION, previous)
    return {"model_name": cfg.model_name, "champion": int(previous), "rolled_back_from": int(champion.version)}


def doctor(cfg: RegisterConfig) -> dict[str, Any]:
    """`mixbct doctor`: recover (see `recover`) and list what remains: versions, aliases, incomplete ones."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    connect_existing(cfg, need_model=False)
    try:
        done = recover(cfg)
    except MlflowException as err:
        raise UpgradeError(
            f"registry.tracking_uri {cfg.tracking_uri}: cannot use the MLflow tracking store: {err}"
        ) from err
    client = MlflowClient()
    versions = _all_versions(client, cfg.model_name)
    try:
        aliases = dict(client.get_registered_model(cfg.model_name).aliases)
    except MlflowException:
        aliases = {}
    return {
        **done,
        "model_name": cfg.model_name,
        "complete_versions": sorted(int(v.version) for v in versions if is_complete(v)),
        "incomplete_versions": sorted(int(v.version) for v in versions if not is_complete(v)),
        "aliases": {k: int(v) for k, v in aliases.items()},
    }


def log_benchmark(cfg: RegisterConfig, grid: str, cells: list[dict[str, Any]], report: dict[str, str] | None = None) -> dict[str, Any]:
    """One parent run `benchmark-<grid>` with a nested child run per cell (params = its overrides, metrics = every
    pair's metrics, tag `criterion.passed`). Nothing is registered."""
    import mlflow

    experiment_id = connect(cfg)
    children = []
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"benchmark-{grid}") as parent:
        mlflow.set_tags({"benchmark.grid": grid, "benchmark.cells": str(len(cells))})
        for cell in cells:
            with mlflow.start_run(experiment_id=experiment_id, run_name=cell["id"], nested=True) as child:
                mlflow.log_params({k: str(v) for k, v in cell["overrides"].items()})
                for pair, values in cell["pairs"].items():
                    mlflow.log_metrics({metric_key(f"{pair}.{m}"): float(v) for m, v in values.items() if v is not None and v == v})
                mlflow.set_tags({"criterion.passed": str(cell["criterion"]["passed"]), "benchmark.cell": cell["id"],
                                 **{f"benchmark.{k}": str(cell[k]) for k in ("method", "scenario", "old", "dim", "ablation", "seed")}})
                children.append(child.info.run_id)
        for path in (report or {}).values():
            if Path(path).is_file():
                mlflow.log_artifact(path, "benchmark")
    return {"run_id": parent.info.run_id, "experiment_id": experiment_id, "children": children}
