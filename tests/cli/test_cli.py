"""Tests for the CLI (embedcache.cli): extract, ls/info/rm, backbones, probe/predict, entry points."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401
from embedcache.cli import main
from tests.tiny_backbone import TINY, make_image_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=5, split_dirs=True)


def invoke(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_extract_then_cache_hit_then_ls_info_rm(runner, folder, tmp_path):
    cache = tmp_path / "c"
    first = invoke(runner, "extract", folder, "-b", TINY, "--workers", 0, "--cache-dir", cache)
    assert first.exit_code == 0, first.output
    assert "extracted 20 images (20 computed), 0 failed" in first.output
    second = invoke(runner, "extract", folder, "-b", TINY, "--workers", 0, "--cache-dir", cache)
    assert second.exit_code == 0 and "cache hit" in second.output and "no model ran" in second.output
    listing = invoke(runner, "ls", "--cache-dir", cache)
    assert TINY in listing.output and "yes" in listing.output
    key = next(cache.glob("*.h5")).name[:8]
    info = invoke(runner, "info", key, "--cache-dir", cache)
    assert "complete   True" in info.output and "train 10" in info.output and "test 10" in info.output
    removed = invoke(runner, "rm", key, "--cache-dir", cache, "--yes")
    assert "removed" in removed.output and not list(cache.glob("*.h5"))


def test_extract_json_summary(runner, folder, tmp_path):
    out = invoke(runner, "extract", folder, "-b", TINY, "--workers", 0, "--cache-dir", tmp_path, "--json")
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    assert payload["n"] == 20 and payload["cache_hit"] is False and payload["failed"] == 0


def test_info_lists_failures(runner, folder, tmp_path):
    (folder / "train" / "a" / "broken.jpg").write_bytes(b"<html></html>")
    invoke(runner, "extract", folder, "-b", TINY, "--workers", 0, "--cache-dir", tmp_path)
    info = invoke(runner, "info", next(tmp_path.glob("*.h5")), "--cache-dir", tmp_path)
    assert "failures   1" in info.output and "train/a/broken.jpg" in info.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["extract", "{folder}", "-b", "resnet5"], "Did you mean"),
        (["extract", "{folder}", "-b", TINY, "--batch-size", "0"], "'batch_size' parameter"),
        (["extract", "/nonexistent/folder", "-b", TINY], "nonexistent"),
        (["info", "deadbeef"], "embedcache ls"),
    ],
)
def test_errors_are_one_clean_line_and_nonzero(runner, folder, tmp_path, args, message):
    args = [a.replace("{folder}", str(folder)) for a in args] + ["--cache-dir", str(tmp_path)]
    result = runner.invoke(main, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output and message in result.output


def test_backbones_lists_offline_default(runner):
    result = invoke(runner, "backbones")
    assert result.exit_code == 0
    line = next(row for row in result.output.splitlines() if row.startswith("efficientnet_lite0 "))
    assert "1280" in line and "yes" in line
    assert "resnet50" in result.output


def test_backbones_describe_and_nodes(runner):
    described = json.loads(invoke(runner, "backbones", TINY).stdout)
    assert described["dim"] == 8
    nodes = invoke(runner, "backbones", "resnet18", "--nodes").output.split()
    assert "layer3.1.relu_1" in nodes


def test_help_teaches_the_data_forms(runner):
    text = invoke(runner, "extract", "--help").output
    for needle in ("torchvision:NAME:ROOT", "manifest.csv", "--max-errors", "--precision", "cache hit"):
        assert needle in text


def test_shim_and_module_entry_points():
    for cmd in ([sys.executable, "cli.py", "--help"], [sys.executable, "-m", "embedcache", "--help"]):
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "embedcache demo" in result.stdout


def test_probe_and_predict_commands(runner, tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=12, split_dirs=True)
    cache = tmp_path / "c"
    invoke(runner, "extract", data, "-b", TINY, "--workers", 0, "--cache-dir", cache)
    key = next(cache.glob("*.h5")).name[:6]
    result = invoke(runner, "probe", key, "--cache-dir", cache, "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert "<- chosen" in result.stdout and "test       top-1" in result.stdout
    assert (tmp_path / "p" / "probe.safetensors").exists()
    fixed = invoke(runner, "probe", key, "--cache-dir", cache, "--penalty", "0.01", "--head", "sklearn", "--json")
    assert json.loads(fixed.stdout)["penalty"] == 0.01
    pred = invoke(runner, "predict", tmp_path / "p", data / "test", "--workers", 0, "--top-k", 2,
                  "--out", tmp_path / "pred.csv")
    assert pred.exit_code == 0 and "24 images classified, 0 failed; top-1 accuracy" in pred.stdout
    header = (tmp_path / "pred.csv").read_text().splitlines()[0]
    assert header == "path,true,pred1,prob1,pred2,prob2"


def test_no_sweep_without_penalty_is_a_usage_error(runner, tmp_path):
    result = runner.invoke(main, ["probe", "abcd", "--no-sweep", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--no-sweep needs --penalty" in result.output
