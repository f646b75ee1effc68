"""MLflow tracking and the conditional registration of a compatible model (the only module importing MLflow).

Every upgrade becomes one MLflow run: params, the resolved config, per-epoch training curves, the cross-model
table and the validation reports. Only when the compatibility gate passes is the new model's ONNX export
(checked against torch) registered as a new version with alias `challenger`; otherwise the run is tagged with
the reason and no version is created.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from components.config import Config, RegisterConfig
from components.errors import UpgradeError
from components.paths import Paths

CHALLENGER, CHAMPION = "challenger", "champion"


def metric_key(name: str) -> str:
    """MLflow metric names allow [A-Za-z0-9_-. /]: 'new/old.tar@far=1e-3' -> 'new/old.tar_far_1e-3'."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name).replace("__", "_")


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
        raise UpgradeError(f"registry.tracking_uri {cfg.tracking_uri}: cannot use the MLflow tracking store: {err}") from err
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


def _onnx_signature(onnx_path: Path, image_size: int) -> Any:
    from mlflow.models import infer_signature

    from components.embed import OnnxEmbedder

    x = np.zeros((2, 1, image_size, image_size), dtype=np.float32)
    return infer_signature(x, OnnxEmbedder(onnx_path)(x)), x


def track_and_register(
    cfg: Config, paths: Paths, fingerprint: dict[str, str], extra_metrics: dict[str, float] | None = None
) -> dict[str, Any]:
    """Log the upgrade as one MLflow run; register the new model only if the gate passed.

    `fingerprint` holds content hashes (data, old model, gallery, params) recorded as tags, so a later run can
    tell whether anything changed.
    """
    import mlflow
    import onnx
    from mlflow import MlflowClient

    from components.embed import load_backbone, onnx_parity
    from components.stages import legacy_info, split_arrays

    reg = cfg.registry
    experiment_id = connect(reg)
    metrics = json.loads((paths.eval / "metrics.json").read_text())
    verdict = metrics["criterion"]
    client = MlflowClient()
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"upgrade-{cfg.train.method}") as run:
        mlflow.log_params(cfg.flat())
        if extra_metrics:
            mlflow.log_metrics(extra_metrics)
        mlflow.log_dict(cfg.as_dict(), "config/resolved_config.json")
        for role, folder in (("legacy", paths.legacy), ("new", paths.model_dir("new")), ("paragon", paths.model_dir("paragon"))):
            _log_history(f"train.{role}", folder / "history.json")
        for pair, values in metrics["pairs"].items():
            mlflow.log_metrics({metric_key(f"{pair}.{m}"): float(v) for m, v in values.items() if v is not None and v == v})
        mlflow.log_artifact(str(paths.eval / "table.md"), "compatibility")
        mlflow.log_artifact(str(paths.eval / "metrics.json"), "compatibility")
        for roc in sorted(paths.eval.glob("roc_*.csv")):
            mlflow.log_artifact(str(roc), "compatibility/roc")
        for figure in sorted(paths.eval.glob("*.png")):  # ROC curves, training curves
            mlflow.log_artifact(str(figure), "compatibility")
        for report in sorted(paths.reports.glob("*.md")):
            mlflow.log_artifact(str(report), "validation")
        tags = {f"gate.{metric_key(m)}": str(ok) for m, ok in verdict["cross"].items()}
        tags.update({f"self.{metric_key(m)}": str(ok) for m, ok in verdict["self"].items()})
        tags.update({"gate.passed": str(verdict["passed"]), **{f"hash.{k}": v for k, v in fingerprint.items()}})
        mlflow.set_tags(tags)
        result: dict[str, Any] = {"run_id": run.info.run_id, "experiment_id": experiment_id, "passed": verdict["passed"]}
        if not verdict["passed"]:
            reason = "; ".join(verdict["reasons"]) or "gate failed"
            mlflow.set_tag("registration", "refused")
            mlflow.set_tag("registration.reason", reason)
            result.update(registered=False, reason=reason)
            return result

        onnx_path = paths.model_dir("new") / "model.onnx"
        backbone, meta = load_backbone(paths.model_dir("new") / "model.pt")
        gallery_images, _ = split_arrays(paths, "gallery")
        parity = onnx_parity(backbone, onnx_path, gallery_images[:128])
        mlflow.log_metric("onnx.max_abs_diff", parity)
        if parity > reg.onnx_tolerance:
            mlflow.set_tag("registration", "refused")
            mlflow.set_tag("registration.reason", f"ONNX parity {parity:.2e} > {reg.onnx_tolerance}")
            raise UpgradeError(f"{onnx_path}: ONNX export differs from torch by {parity:.2e} (> {reg.onnx_tolerance})")
        signature, example = _onnx_signature(onnx_path, int(meta["image_size"]))
        info = mlflow.onnx.log_model(
            onnx_model=onnx.load(str(onnx_path)),
            name="model",
            signature=signature,
            input_example=example,
            onnx_execution_providers=["CPUExecutionProvider"],
            pip_requirements=["onnx", "onnxruntime"],
        )
        old = legacy_info(paths)
        version = mlflow.register_model(info.model_uri, reg.model_name, tags=tags)
        try:
            description = (
                f"{cfg.train.method} upgrade ({cfg.train.arch}, d={cfg.train.embedding_dim}) compatible with old model "
                f"{old.get('source_model', 'legacy/' + old['model'])} (sha256 {old['model_sha256'][:12]}), checked "
                f"against gallery sha256 {old['gallery_sha256'][:12]}. Gate: {', '.join(cfg.evaluate.gate_metrics)} passed."
            )
            client.update_model_version(reg.model_name, version.version, description=description)
            client.set_model_version_tag(reg.model_name, version.version, "run_id", run.info.run_id)
            client.set_model_version_tag(reg.model_name, version.version, "old_model_sha256", old["model_sha256"])
            client.set_model_version_tag(reg.model_name, version.version, "gallery_sha256", old["gallery_sha256"])
            if "upgrade_key" in fingerprint:
                client.set_model_version_tag(reg.model_name, version.version, "upgrade_key", fingerprint["upgrade_key"])
            client.set_registered_model_alias(reg.model_name, CHALLENGER, version.version)
        except Exception:
            # Atomic registration: a version without its tags and alias is worse than none.
            client.delete_model_version(reg.model_name, version.version)
            raise
        mlflow.set_tag("registration", f"{reg.model_name}/{version.version}")
        result.update(registered=True, model_name=reg.model_name, version=int(version.version), alias=CHALLENGER)
        return result


def find_registered(cfg: RegisterConfig, key: str) -> dict[str, Any] | None:
    """The newest registered version whose inputs hash to `key` (tag `upgrade_key`), if any."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    connect(cfg)
    try:
        found = MlflowClient().search_model_versions(f"name='{cfg.model_name}' and tags.upgrade_key='{key}'")
    except MlflowException:
        return None  # no registered model yet
    if not found:
        return None
    newest = max(found, key=lambda v: int(v.version))
    return {"model_name": cfg.model_name, "version": int(newest.version), "run_id": newest.run_id}


def _version_or_fail(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        raise UpgradeError(f"registered model {name!r} has no version {version}") from err


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(cfg: RegisterConfig, version: str | None = None) -> dict[str, Any]:
    """Move `champion` to `version` (default: the current `challenger`).

    Refused when the version does not exist, its gate did not pass, or it was checked against a different
    gallery than the current champion serves (it would not be compatible with what production searches).
    """
    from mlflow import MlflowClient

    connect(cfg)
    client = MlflowClient()
    if version is None:
        challenger = _alias_version(client, cfg.model_name, CHALLENGER)
        if challenger is None:
            raise UpgradeError(f"registered model {cfg.model_name!r} has no @{CHALLENGER} to promote")
        version = str(challenger.version)
    candidate = _version_or_fail(client, cfg.model_name, version)
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

    connect(cfg)
    client = MlflowClient()
    champion = _alias_version(client, cfg.model_name, CHAMPION)
    if champion is None:
        raise UpgradeError(f"registered model {cfg.model_name!r} has no @{CHAMPION} to roll back")
    previous = champion.tags.get("previous_champion")
    if not previous:
        raise UpgradeError(f"{cfg.model_name} version {champion.version} is the first @{CHAMPION}; nothing to roll back to")
    _version_or_fail(client, cfg.model_name, previous)
    client.set_registered_model_alias(cfg.model_name, CHAMPION, previous)
    return {"model_name": cfg.model_name, "champion": int(previous), "rolled_back_from": int(champion.version)}


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
