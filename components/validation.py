"""Great Expectations suites, defined in code, for the dataset manifest and for embedding matrices.

Both suites validate per-row tables (GX Core 1.x: ephemeral context -> pandas data source -> dataframe asset
-> whole-dataframe batch -> ExpectationSuite -> ValidationDefinition -> Checkpoint). Properties that span rows
(class sizes, file decoding, which splits a rendering is used in) are first turned into derived per-row
columns, so that every rule is a real GX expectation and a failure names the offending rows.

Only this module imports great_expectations, and only inside functions: importing it costs ~2-3 s.
Validation functions return a `ValidationReport`; callers decide to stop with `raise_for_failure`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.errors import ValidationFailed
from components.io import write_text

SPLITS = (
    "old_train", "new_train", "gallery", "query", "val_gallery", "val_query", "shift_gallery", "shift_query",
    "val_shift_gallery", "val_shift_query",
)  # fmt: skip
COLUMNS = ("id", "source", "sample", "identity", "split", "label")
# Label groups: gallery, query and the shifted set share the test labels; validation has its own.
GROUP_OF_SPLIT = {
    "old_train": "old_train", "new_train": "new_train",
    "gallery": "test", "query": "test", "shift_gallery": "test", "shift_query": "test",
    "val_gallery": "val", "val_query": "val", "val_shift_gallery": "val", "val_shift_query": "val",
}  # fmt: skip
GROUPS = ("old_train", "new_train", "test", "val")
# Evaluation groups and the splits that enrol and query their identities.
_ENROL = {"test": ("gallery", "query"), "val": ("val_gallery", "val_query")}
INT_TYPES = ["int64", "int32", "int16", "int8", "Int64", "Int32", "Int16", "Int8"]
N_EXAMPLES = 5  # offending values named per failure line
_DATA_SOURCE = "components-validation"

_context_cache: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of one suite. `failures` has one human line per failed expectation."""

    name: str
    success: bool
    failures: list[str]
    markdown: str
    source_name: str = ""
    report_path: Path | None = None  # where the markdown was written, if it was

    def raise_for_failure(self, report_path: Path | None = None) -> None:
        """Raise ValidationFailed naming the suite, the source, the failed expectations and the report."""
        if self.success:
            return
        path = report_path if report_path is not None else self.report_path
        lines = "\n".join(f"  - {line}" for line in self.failures)
        message = (
            f"validation suite '{self.name}' failed for {self.source_name}: "
            f"{len(self.failures)} expectation(s) failed\n{lines}"
        )
        if path is not None:
            message += f"\nfull report: {path}"
        raise ValidationFailed(message, report=None if path is None else str(path))


# ------------------------------------------------------------------------------------------------ GX plumbing


def _gx() -> Any:
    """Import great_expectations quietly and offline."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    with warnings.catch_warnings():
        # GX 1.24 imports the deprecated sre_constants / sre_parse modules (Python 3.11+).
        warnings.filterwarnings("ignore", message=r"module 'sre_\w+' is deprecated", category=DeprecationWarning)
        import great_expectations as gx
    return gx


def _context() -> Any:
    """One ephemeral (in-memory) GX context per process; creating it is cheap but not free."""
    if "ctx" not in _context_cache:
        gx = _gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        ctx.data_sources.add_pandas(_DATA_SOURCE)
        _context_cache["ctx"] = ctx
    return _context_cache["ctx"]


def _run_suite(name: str, table: pd.DataFrame, expectations: list[Any], index_columns: list[str]) -> list[Any]:
    """Run `expectations` on `table` through a Checkpoint; results in the order the expectations were given."""
    gx = _gx()
    ctx = _context()
    source = ctx.data_sources.get(_DATA_SOURCE)
    try:
        asset = source.get_asset(name)
    except LookupError:
        asset = source.add_dataframe_asset(name)
    try:
        batch = asset.get_batch_definition("whole")
    except (KeyError, LookupError):
        batch = asset.add_batch_definition_whole_dataframe("whole")
    for order, expectation in enumerate(expectations):
        expectation.meta = {**(expectation.meta or {}), "order": order}
    suite = ctx.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = ctx.checkpoints.add_or_update(
        gx.Checkpoint(
            name=name,
            validation_definitions=[definition],
            actions=[],
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": index_columns,
                "partial_unexpected_count": 20,
            },
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": table})
    (suite_result,) = result.run_results.values()
    return sorted(suite_result.results, key=lambda r: r.expectation_config.meta["order"])


def _expect(
    gx: Any, kind: str, description: str, show: Sequence[str] = (), unit: str = "rows", **kwargs: Any
) -> Any:
    """Build one GX expectation; `show` names the fields of an offending row that a failure line quotes."""
    cls = getattr(gx.expectations, kind)
    return cls(description=description, meta={"show": list(show), "unit": unit}, **kwargs)


# ------------------------------------------------------------------------------------------------ rendering


def _exception_message(result: Any) -> str | None:
    info = result.exception_info or {}
    if "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    for value in info.values():  # {metric id: {...}} when a metric failed to compute
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    return str(value)


def _examples(result: Any, show: Sequence[str], detail: Mapping[str, str]) -> tuple[list[str], bool]:
    """A few distinct offending rows (as `k=v` of the `show` fields), and whether there are more."""
    res = result.result or {}
    rows = res.get("partial_unexpected_index_list") or []
    items: list[str] = []
    for row in rows:
        if isinstance(row, dict) and show:
            fields = [(k, row.get(k)) for k in show if k in row]
            text = _fmt(fields[0][1]) if len(fields) == 1 else ", ".join(f"{k}={_fmt(v)}" for k, v in fields)
            if len(fields) == 1 and str(fields[0][1]) in detail:
                text += f" ({detail[str(fields[0][1])]})"
        else:
            text = _fmt(row)
        if text not in items:
            items.append(text)
    if not items:
        items = list(dict.fromkeys(_fmt(v) for v in res.get("partial_unexpected_list") or []))
    count = int(res.get("unexpected_count") or 0)
    return items[:N_EXAMPLES], len(items) > N_EXAMPLES or count > len(rows or items)


def _condition(condition: Any) -> str:
    """`group == test` for a GX row condition (serialised as a dict in the expectation's kwargs)."""
    if hasattr(condition, "dict"):
        condition = condition.dict()
    if isinstance(condition, dict) and {"column", "operator", "parameter"} <= condition.keys():
        column = condition["column"]
        name = column.get("name", column) if isinstance(column, dict) else column
        return f"{name} {condition['operator']} {condition['parameter']}"
    return str(condition)


def _where(config: Any) -> str:
    kwargs = config.kwargs
    column = kwargs.get("column") or kwargs.get("column_list") or ""
    if isinstance(column, list):
        column = "(" + ", ".join(column) + ")"
    condition = kwargs.get("row_condition")
    return f"{column}" + (f" where {_condition(condition)}" if condition else "")


def _observed(result: Any, detail: Mapping[str, str], with_examples: bool = True) -> str:
    error = _exception_message(result)
    if error:
        return f"error: {error}"
    res = result.result or {}
    if "unexpected_count" in res:
        meta = result.expectation_config.meta or {}
        evaluated = int(res.get("element_count") or 0) - int(res.get("missing_count") or 0)
        text = f"{res['unexpected_count']} of {evaluated} {meta.get('unit', 'rows')} unexpected"
        examples, more = _examples(result, meta.get("show", []), detail)
        if with_examples and examples:
            text += ", e.g. " + "; ".join(examples) + (" ..." if more else "")
        return text
    if "observed_value" in res:
        return f"observed {_fmt(res['observed_value'])}"
    return "met" if result.success else "not met"


def _check(config: Any) -> str:
    skip = {"column", "column_list", "batch_id", "row_condition", "condition_parser"}
    return ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in config.kwargs.items() if k not in skip)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _report(
    name: str, source_name: str, summary: list[str], results: list[Any], detail: Mapping[str, str],
    report_path: Path | None,
) -> ValidationReport:  # fmt: skip
    failures = [
        f"{name} [{source_name}]: {r.expectation_config.description} ({r.expectation_config.type}"
        f" on {_where(r.expectation_config) or 'the table'}): {_observed(r, detail)}"
        for r in results
        if not r.success
    ]
    success = not failures
    lines = [
        f"# Validation report: {name}",
        "",
        f"- source: `{source_name}`",
        f"- result: **{'PASSED' if success else 'FAILED'}** ({len(results) - len(failures)} of {len(results)} "
        "expectations met)",
        *[f"- {s}" for s in summary],
        "",
    ]
    body = []
    for i, r in enumerate(results, 1):
        c = r.expectation_config
        body.append([
            _cell(x)
            for x in (
                str(i), "pass" if r.success else "**FAIL**", c.type, c.description or "", _where(c), _check(c),
                _observed(r, detail),
            )
        ])  # fmt: skip
    table = pd.DataFrame(body, columns=["#", "status", "expectation", "description", "column", "check", "observed"])
    # Cells are text already (an observed "0.5" stays as written): no number parsing; every column left-aligned.
    lines.append(table.to_markdown(index=False, disable_numparse=True))
    if failures:
        lines += ["", "## Failures", "", *[f"- {f}" for f in failures]]
    markdown = "\n".join(lines) + "\n"
    if report_path is not None:
        write_text(report_path, markdown)
    return ValidationReport(name, success, failures, markdown, source_name, report_path)


# ------------------------------------------------------------------------------------------------ manifest


def _check_files(sources: pd.Series, decode: Callable[[Path], None]) -> tuple[dict[str, bool], dict[str, str]]:
    """Existence per unique source, and the decode error of each file that exists but does not decode."""
    exists: dict[str, bool] = {}
    errors: dict[str, str] = {}
    for source in sources:
        if not isinstance(source, (str, os.PathLike)) or not str(source) or not Path(source).is_file():
            exists[source] = False
            continue
        exists[source] = True
        try:
            decode(Path(source))
        except Exception as exc:  # noqa: BLE001  (any failure to decode is a data error to report)
            reason = str(exc).strip().removeprefix(f"{source}: ")  # the report names the file already
            errors[source] = f"{type(exc).__name__}: {reason}"[:200]
    return exists, errors


def _manifest_table(
    manifest: pd.DataFrame, decode: Callable[[Path], None], shared_train_samples: bool
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The manifest plus derived per-row columns that turn cross-row rules into per-row ones."""
    df = manifest.loc[:, list(COLUMNS)].reset_index(drop=True)
    df["group"] = df["split"].map(GROUP_OF_SPLIT)
    # Files: checked once per unique source, on its first row (null = checked on another row).
    first = ~df["source"].duplicated()
    exists, errors = _check_files(df.loc[first, "source"], decode)
    df["file_exists"] = pd.Series(pd.NA, index=df.index, dtype="boolean")
    df["file_decodes"] = pd.Series(pd.NA, index=df.index, dtype="boolean")
    df.loc[first, "file_exists"] = df.loc[first, "source"].map(exists).astype("boolean")
    checked = first & df["file_exists"].fillna(False).astype(bool)
    df.loc[checked, "file_decodes"] = ~df.loc[checked, "source"].isin(list(errors))
    # Class sizes, per label group (gallery + query together for the test group).
    df["class_count"] = df.groupby(["group", "label"], dropna=True)["id"].transform("size").astype("Int64")
    test = df["group"] == "test"
    evaluated = df["group"].isin(list(_ENROL))
    for i, side in enumerate(("gallery", "query")):
        column = pd.Series(pd.NA, index=df.index, dtype="Int64")
        for group, splits in _ENROL.items():
            rows = df["group"] == group
            if not rows.any():
                continue
            counts = df.loc[rows & (df["split"] == splits[i])].groupby("identity").size()
            column[rows] = df.loc[rows, "identity"].map(counts).fillna(0).astype("int64")
        df[f"{side}_count"] = column
    # Disjointness: a rendering lives in one split; with shared_train_samples the old and new training sets
    # may share renderings (extended scenarios), never with gallery or query.
    partition = df["split"]
    if shared_train_samples:
        partition = partition.replace({"old_train": "train", "new_train": "train"})
    df["rendering_splits"] = (
        partition.groupby([df["source"], df["sample"]], dropna=False).transform("nunique").astype("Int64")
    )
    train_identities = set(df.loc[df["group"].isin(["old_train", "new_train"]), "identity"])
    df["in_train_identity"] = pd.Series(pd.NA, index=df.index, dtype="boolean")
    df.loc[evaluated, "in_train_identity"] = df.loc[evaluated, "identity"].isin(train_identities)
    val = df["group"] == "val"
    df["in_test_identity"] = pd.Series(pd.NA, index=df.index, dtype="boolean")
    if val.any():
        df.loc[val, "in_test_identity"] = df.loc[val, "identity"].isin(set(df.loc[test, "identity"]))
    return df, errors


def _manifest_suite(gx: Any, num_classes: Mapping[str, int], complete: bool, shared: bool) -> list[Any]:
    from great_expectations.expectations.row_conditions import Column

    e: list[Any] = [_expect(gx, "ExpectTableRowCountToBeBetween", "the manifest has rows", min_value=1)]
    e += [_expect(gx, "ExpectColumnToExist", f"column '{c}' exists", column=c) for c in COLUMNS]
    if not complete:  # derived columns need every base column
        return e
    e += [_expect(gx, "ExpectColumnValuesToNotBeNull", f"no null {c}", ["id"], column=c) for c in COLUMNS]
    e += [
        _expect(gx, "ExpectColumnValuesToBeOfType", f"{c} is a string", ["id"], column=c, type_="str")
        for c in ("id", "source", "identity", "split")
    ]
    e += [
        _expect(gx, "ExpectColumnValuesToBeInTypeList", f"{c} is an integer", column=c, type_list=INT_TYPES)
        for c in ("sample", "label")
    ]
    e += [
        _expect(gx, "ExpectColumnValuesToBeInSet", "split is a known split", ["id", "split"], column="split",
                value_set=list(SPLITS)),
        _expect(gx, "ExpectColumnValuesToBeBetween", "rendering index is >= 0", ["id", "sample"], column="sample",
                min_value=0),
        _expect(gx, "ExpectColumnValuesToBeInSet", "every raw file exists", ["source"], "files", column="file_exists",
                value_set=[True]),
        _expect(gx, "ExpectColumnValuesToBeInSet", "every raw file decodes", ["source"], "files", column="file_decodes",
                value_set=[True]),
    ]  # fmt: skip
    for group in GROUPS:
        n = int(num_classes.get(group, 0))
        where = Column("group") == group
        if n > 0:
            e.append(_expect(gx, "ExpectColumnValuesToBeBetween", f"{group} labels in [0, {n})", ["id", "label"],
                             column="label", min_value=0, max_value=n - 1, row_condition=where))  # fmt: skip
        else:  # an empty group (e.g. the user brings the old model) must have no rows at all
            e.append(_expect(gx, "ExpectColumnValuesToBeInSet", f"{group} has 0 classes, so no rows",
                             ["id", "label"], column="label", value_set=[], row_condition=where))  # fmt: skip
        e.append(_expect(gx, "ExpectColumnUniqueValueCountToBeBetween", f"{group} uses all {n} labels",
                         column="label", min_value=n, max_value=n, row_condition=where))  # fmt: skip
    e += [
        _expect(gx, "ExpectColumnValuesToBeBetween", "every class has >= 2 samples (per label group)",
                ["split", "identity", "label", "class_count"], column="class_count", min_value=2),
        _expect(gx, "ExpectColumnValuesToBeBetween", "every test and validation identity has >= 1 gallery sample",
                ["split", "identity", "gallery_count"], column="gallery_count", min_value=1),
        _expect(gx, "ExpectColumnValuesToBeBetween", "every test and validation identity has >= 1 query sample",
                ["split", "identity", "query_count"], column="query_count", min_value=1),
        _expect(gx, "ExpectCompoundColumnsToBeUnique", "no rendering appears twice in one split",
                ["split", "source", "sample"], column_list=["split", "source", "sample"]),
        _expect(gx, "ExpectColumnValuesToBeInSet",
                "splits are disjoint: each (source, sample) rendering is used by one split"
                + (" (old_train and new_train may share)" if shared else ""),
                ["split", "source", "sample"], column="rendering_splits", value_set=[1]),
        _expect(gx, "ExpectColumnValuesToBeInSet",
                "test and validation identities never appear in old_train or new_train",
                ["split", "identity"], column="in_train_identity", value_set=[False]),
        _expect(gx, "ExpectColumnValuesToBeInSet", "validation identities never appear in the test set",
                ["split", "identity"], column="in_test_identity", value_set=[False]),
        _expect(gx, "ExpectColumnValuesToBeUnique", "sample ids are unique", ["id"], column="id"),
    ]  # fmt: skip
    return e


def validate_manifest(
    manifest: pd.DataFrame,
    num_classes: Mapping[str, int],
    decode: Callable[[Path], None],
    source_name: str,
    report_path: Path | None = None,
    shared_train_samples: bool = False,
) -> ValidationReport:
    """Run the manifest suite: files decode, labels in range, classes >= 2 samples, disjoint splits, unique ids.

    `decode(path)` is called once per unique source and must raise if the file is unreadable.
    `shared_train_samples` lets old_train and new_train share renderings (the "extended" scenarios).
    """
    gx = _gx()
    complete = all(c in manifest.columns for c in COLUMNS)
    if complete:
        table, errors = _manifest_table(manifest, decode, shared_train_samples)
    else:
        table, errors = manifest.reset_index(drop=True), {}
    index_columns = [c for c in ("id", "split", "identity", "label", "source", "sample") if c in table.columns]
    expectations = _manifest_suite(gx, num_classes, complete, shared_train_samples)
    results = _run_suite("manifest", table, expectations, index_columns)
    summary = [f"rows: {len(table)}", f"num_classes: {dict(num_classes)}"]
    if complete:
        summary += [
            f"unique source files: {table['source'].nunique()}",
            "rows per split: " + ", ".join(f"{s}={int((table['split'] == s).sum())}" for s in SPLITS),
            f"old_train/new_train may share renderings: {shared_train_samples}",
        ]
    return _report("manifest", source_name, summary, results, errors, report_path)


# ------------------------------------------------------------------------------------------------ embeddings


def _embedding_table(embeddings: np.ndarray, chunk: int = 16384) -> pd.DataFrame:
    """One row per embedding: ndim of the array, values per row, NaN/inf count and L2 norm (NaN if non-finite)."""
    x = np.asarray(embeddings)
    n = x.shape[0] if x.ndim >= 1 else 1
    dim = int(np.prod(x.shape[1:])) if x.ndim >= 1 else 1
    x = x.reshape(n, dim)  # [n, d]; a 1-D array becomes [n, 1], a 3-D one [n, a*b]
    nonfinite = np.full(n, dim, dtype=np.int64)
    norm = np.full(n, np.nan)
    if x.dtype.kind in "biuf":
        for start in range(0, n, chunk):
            block = x[start : start + chunk].astype(np.float64)  # [c, d]
            finite = np.isfinite(block)
            nonfinite[start : start + chunk] = dim - finite.sum(axis=1)
            norm[start : start + chunk] = np.sqrt(np.square(np.where(finite, block, 0.0)).sum(axis=1))
    norm[nonfinite > 0] = np.nan  # those rows already fail the finiteness expectation
    return pd.DataFrame(
        {"row": np.arange(n), "ndim": np.full(n, np.ndim(embeddings)), "dim": np.full(n, dim),
         "nonfinite": nonfinite, "norm": norm}
    )  # fmt: skip


def validate_embeddings(
    embeddings: np.ndarray,
    expected_dim: int,
    expected_rows: int,
    source_name: str,
    suite: str = "embeddings",
    norm_range: tuple[float, float] = (1e-3, 1e3),
    report_path: Path | None = None,
) -> ValidationReport:
    """Run the embedding suite on a per-row table: 2-D, dim == expected_dim, finite, norm in range, row count."""
    gx = _gx()
    array = np.asarray(embeddings)
    table = _embedding_table(array)
    lo, hi = float(norm_range[0]), float(norm_range[1])
    expectations = [
        _expect(gx, "ExpectColumnValuesToBeInSet", "a 2-D matrix [n, d]", ["row", "ndim"], column="ndim",
                value_set=[2]),
        _expect(gx, "ExpectColumnValuesToBeInSet", f"every embedding has {expected_dim} values", ["row", "dim"],
                column="dim", value_set=[int(expected_dim)]),
        _expect(gx, "ExpectColumnValuesToBeInSet", "no NaN or inf values", ["row", "nonfinite"],
                column="nonfinite", value_set=[0]),
        _expect(gx, "ExpectColumnValuesToBeBetween", f"L2 norm in [{lo:g}, {hi:g}]", ["row", "norm"],
                column="norm", min_value=lo, max_value=hi),
        _expect(gx, "ExpectTableRowCountToEqual", f"{expected_rows} rows (one per manifest row)",
                value=int(expected_rows)),
    ]  # fmt: skip
    results = _run_suite(suite, table, expectations, ["row"])
    finite = table["norm"].dropna()
    summary = [
        f"array: shape {tuple(array.shape)}, dtype {array.dtype}",
        f"expected: [{expected_rows}, {expected_dim}]",
        "finite norms min/mean/max: "
        + (f"{finite.min():.4g} / {finite.mean():.4g} / {finite.max():.4g}" if len(finite) else "n/a"),
    ]
    return _report(suite, source_name, summary, results, {}, report_path)
