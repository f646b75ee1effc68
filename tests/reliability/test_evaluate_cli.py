"""`mixbct evaluate` as a user drives it: piped output, JSON, named models, a paragon, image sizes, open-set folders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cases import case
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from components.embed import export_onnx, save_backbone
from components.evaluate import METRICS
from components.io import file_sha256
from components.models import build_backbone
from flows.cli import app

runner = CliRunner()
PEOPLE = ["alice", "bob", "carol", "dave", "eve", "frank"]
TARS = ("tar@far=1e-4", "tar@far=1e-3", "tar@far=1e-2")


class _AnySize(nn.Module):
    """A model whose ONNX input is [n, 1, H, W] with H and W free (Embedder.image_size == -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))  # [B, 16]


def _folder(root: Path, identities: list[str], per: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in identities:
        (root / name).mkdir(parents=True)
        for j in range(per):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / name / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models (torch and ONNX, 32 px; one 48 px; one of any input size) and a query/gallery pair of folders."""
    t = tmp_path_factory.mktemp("evaluate")
    paths = {}
    for i, name in enumerate(("old", "new", "paragon")):
        torch.manual_seed(i)
        model = build_backbone("small_cnn", 16, 32).eval()
        paths[name] = save_backbone(model, t / f"{name}.pt", "small_cnn", 16, 32)
        if name == "old":
            paths["old_onnx"] = export_onnx(model, t / "old.onnx", 32)
    paths["size48"] = save_backbone(build_backbone("small_cnn", 16, 48), t / "size48.pt", "small_cnn", 16, 48)
    torch.onnx.export(
        _AnySize().eval(), (torch.zeros(2, 1, 32, 32),), str(t / "any.onnx"), input_names=["x"],
        output_names=["embedding"], external_data=False, dynamo=True, verbose=False,
        dynamic_shapes={"x": {0: torch.export.Dim("batch"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")}},
    )  # fmt: skip
    paths["any"] = t / "any.onnx"
    paths["q"] = _folder(t / "q", PEOPLE, seed=1)
    paths["g"] = _folder(t / "g", PEOPLE, seed=2)
    return paths


def _evaluate(kit: dict[str, Path], *args: str, query: str = "new", gallery: str = "old_onnx", env=None):
    base = ["evaluate", "--query-model", str(kit[query]), "--gallery-model", str(kit[gallery]),
            "--query-dir", str(kit["q"]), "--gallery-dir", str(kit["g"])]  # fmt: skip
    return runner.invoke(app, [*base, *args], env=env)


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    for f in fragments:
        assert f in result.output, (f, result.output)


@case("mixbct evaluate", "output piped to a file", "exit 0; full-width table: 3 distinct TAR@FAR headers, whole labels")
def test_piped_table_is_full_width(kit: dict[str, Path]) -> None:
    result = _evaluate(kit, "--paragon", str(kit["paragon"]))  # CliRunner's stdout is not a terminal
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "top1" in line)
    assert all(h in header for h in TARS) and "…" not in result.stdout
    for label in ("paragon/paragon", "retention new/new ÷ paragon/paragon", "cross: new/old > old/old"):
        assert label in result.stdout
    assert "gate (top1, tar@far=1e-3):" in result.stdout


@case("mixbct evaluate", "table in an 80-column terminal, with a paragon",
      "exit 0; fits in 80 columns: row labels wrap, TAR@FAR headers and numbers stay whole")  # fmt: skip
def test_terminal_table_keeps_headers_whole(kit: dict[str, Path]) -> None:
    result = _evaluate(kit, "--paragon", str(kit["paragon"]), env={"TTY_COMPATIBLE": "1", "COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)  # a terminal gets colours
    table = [line for line in text.splitlines() if line[:1] in "┏┃┡│├└"]
    assert "…" not in text and max(len(line) for line in table) <= 80
    assert all(h in next(line for line in table if "top1" in line) for h in TARS)
    assert any(line.startswith("│ pa") for line in table)  # "paragon/paragon" wraps in its column ...
    assert not any(re.search(r"\d\.\d{0,3} *│", line) for line in table)  # ... numbers keep their 4 decimals


@case("mixbct evaluate", "asks for `--json`", "exit 0; stdout is JSON only: metrics per pair, verdict, models, counts")
def test_json_holds_everything(kit: dict[str, Path]) -> None:
    result = _evaluate(kit, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"models", "image_size", "data", "pairs", "criterion", "notes"}
    assert set(out["pairs"]) == {"old/old", "new/old", "new/new"}
    assert all(set(row) == set(METRICS) for row in out["pairs"].values())
    assert out["models"]["new"] == {"role": "query", "path": str(kit["new"]), "sha256": file_sha256(kit["new"]),
                                    "dim": 16, "input_size": 32}  # fmt: skip
    assert out["models"]["old"]["sha256"] == file_sha256(kit["old_onnx"]) and out["image_size"] == 32
    assert out["data"]["queries"] == out["data"]["gallery"] == out["data"]["retrieval_queries"] == 18
    assert out["data"]["identities"] == {"query": 6, "gallery": 6, "shared": 6}
    assert out["data"]["query_identities_without_gallery"] == [] and out["notes"] == []
    verdict = out["criterion"]
    assert verdict["models"] == {"new": "new", "old": "old", "paragon": None}
    assert isinstance(verdict["passed"], bool) and isinstance(verdict["reasons"], list)
    assert set(verdict["cross"]) == set(METRICS) and verdict["update_gain"] is None


@case("mixbct evaluate", "adds `--output results.json`", "exit 0; table printed, the same JSON written atomically")
def test_output_file_and_table(kit: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "out" / "results.json"
    result = _evaluate(kit, "--output", str(target))
    assert result.exit_code == 0, result.output
    assert "query/gallery" in result.stdout and all(h in result.stdout for h in TARS)
    saved = json.loads(target.read_text())
    assert set(saved["pairs"]) == {"old/old", "new/old", "new/new"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]  # no temp file left
    again = _evaluate(kit, "--json")
    assert json.loads(again.stdout)["pairs"] == saved["pairs"]


@case("mixbct evaluate", "names the models and adds a `--paragon`",
      "exit 0; the names in every row and JSON key, paragon rows, update gain and retention")  # fmt: skip
def test_named_models_and_paragon(kit: dict[str, Path]) -> None:
    result = _evaluate(kit, "--query-name", "v2", "--gallery-name", "v1", "--paragon", str(kit["paragon"]),
                       "--paragon-name", "v2-solo", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["pairs"]) == {"v1/v1", "v2/v1", "v2/v2", "v2-solo/v1", "v2-solo/v2-solo"}
    assert {k: v["role"] for k, v in out["models"].items()} == {"v2": "query", "v1": "gallery", "v2-solo": "paragon"}
    verdict = out["criterion"]
    assert verdict["models"] == {"new": "v2", "old": "v1", "paragon": "v2-solo"}
    assert set(verdict["update_gain"]) == set(verdict["retention"]) == set(METRICS)
    assert all(("v2/" in r and "v1/v1" in r) for r in verdict["reasons"])
    table = _evaluate(kit, "--query-name", "v2", "--gallery-name", "v1", "--paragon", str(kit["paragon"]),
                      "--paragon-name", "v2-solo")  # fmt: skip
    assert "new" not in table.stdout and "old" not in table.stdout
    assert "retention v2/v2 ÷ v2-solo/v2-solo" in table.stdout and "v2-solo/v1" in table.stdout


@case("mixbct evaluate", "gives two models the same name", "exit 1, one line naming both options")
def test_same_names_refused(kit: dict[str, Path]) -> None:
    _one_line_error(_evaluate(kit, "--query-name", "old"), "--query-name and --gallery-name are both 'old'")
    _one_line_error(_evaluate(kit, "--paragon", str(kit["paragon"]), "--paragon-name", "new"),
                    "--query-name and --paragon-name are both 'new'")  # fmt: skip


@case("mixbct evaluate", "`--image-size 48` for 32-px models",
      "exit 1, one line naming the model file, its 32x32 input and --image-size")  # fmt: skip
def test_wrong_image_size_refused(kit: dict[str, Path]) -> None:
    _one_line_error(_evaluate(kit, "--image-size", "48"), str(kit["new"]), "32x32", "--image-size is 48")


@case("mixbct evaluate", "models of different input sizes (32, 48 px)", "exit 1, one line naming both files and sizes")
def test_different_input_sizes_refused(kit: dict[str, Path]) -> None:
    _one_line_error(_evaluate(kit, query="size48"), str(kit["size48"]), "48x48", str(kit["old_onnx"]), "32x32")


@case("mixbct evaluate", "models that take any input size, no `--image-size`",
      "exit 1 asking for --image-size; with it, exit 0 at that size")  # fmt: skip
def test_dynamic_models_need_an_image_size(kit: dict[str, Path]) -> None:
    _one_line_error(_evaluate(kit, query="any", gallery="any"), str(kit["any"]), "pass --image-size")
    result = _evaluate(kit, "--image-size", "24", "--json", query="any", gallery="any")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["image_size"] == 24 and out["models"]["new"]["input_size"] is None


@case("mixbct evaluate", "a query identity has no gallery folder, a gallery one no queries, an empty folder",
      "exit 0; each named by folder; its queries left out of top-k/mAP, kept as TAR@FAR impostors")  # fmt: skip
def test_open_set_identities_named(kit: dict[str, Path], tmp_path: Path) -> None:
    q = shutil.copytree(kit["q"], tmp_path / "q")
    _folder(q, ["zoe"], per=2, seed=3)
    (q / "nobody").mkdir()
    g = shutil.copytree(kit["g"], tmp_path / "g")
    _folder(g, ["yan"], seed=4)
    args = ["--query-dir", str(q), "--gallery-dir", str(g)]
    result = _evaluate(kit, *args)
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert ("note: 1 query identity has no gallery image: zoe (their 2 queries are left out of top-k and mAP, "
            "and kept in TAR@FAR as impostors)") in out  # fmt: skip
    assert "note: 1 gallery identity has no query: yan (kept in the gallery as distractors)" in out
    assert f"note: {q}: skipped 1 identity folder with no" in out and "image: nobody" in out
    data = json.loads(_evaluate(kit, *args, "--json").stdout)
    assert data["data"]["query_identities_without_gallery"] == ["zoe"]
    assert data["data"]["gallery_identities_without_query"] == ["yan"]
    assert data["data"]["empty_identity_folders"] == {"query": ["nobody"], "gallery": []}
    assert (data["data"]["queries"], data["data"]["retrieval_queries"]) == (20, 18)
    # zoe's queries do not change the 1:N metrics: the same as without zoe's folder at all
    shutil.rmtree(q / "zoe")
    without = json.loads(_evaluate(kit, *args, "--json").stdout)
    for pair, row in data["pairs"].items():
        assert all(row[m] == without["pairs"][pair][m] for m in ("top1", "top5", "mAP")), pair


@case("mixbct evaluate", "an empty query folder, or folders sharing no identity", "exit 1, one line naming the folders")
def test_empty_or_disjoint_folders_refused(kit: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(_evaluate(kit, "--query-dir", str(empty)), f"{empty}: no identity folders")
    other = _folder(tmp_path / "other", ["xavier", "yolanda"])
    _one_line_error(_evaluate(kit, "--query-dir", str(other)), str(other), str(kit["g"]), "no identity folder name")
