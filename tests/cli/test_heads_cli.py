"""The CLI with the k-NN and ridge heads, numeric targets and label sets: probe, predict, extract
--target/--targets and bench --heads (embedcache.cli.probe, head_reports, extract, bench)."""

import csv

import pytest
from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401
from embedcache.cli import main
from tests.targets_data import make_multilabel_csv, make_regression_csv
from tests.tiny_backbone import TINY, make_image_folder


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "d", per_class=12, split_dirs=True)


def test_probe_knn_prints_the_k_table(folder, tmp_path):
    assert run("extract", folder, "-b", TINY, "--workers", 0, "--cache-dir", tmp_path / "c").exit_code == 0
    key = next((tmp_path / "c").glob("*.h5")).name[:6]
    result = run("probe", key, "--head", "knn", "--ks", "1,3,5", "--cache-dir", tmp_path / "c", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert "<- chosen" in result.stdout and "head       knn (classes), k " in result.stdout
    assert "references: train+val" in result.stdout and "test       top-1" in result.stdout
    pred = run("predict", tmp_path / "p", folder / "test", "--workers", 0, "--out", tmp_path / "pred.csv")
    assert pred.exit_code == 0 and "top-1 accuracy" in pred.stdout
    ridge = run("probe", key, "--head", "ridge", "--penalty", "0.1", "--cache-dir", tmp_path / "c", "--out",
                tmp_path / "r")
    assert ridge.exit_code == 0 and "penalty 0.1 (fixed" in ridge.stdout
    scores = run("predict", tmp_path / "r", folder / "test", "--workers", 0, "--out", tmp_path / "r.csv")
    assert scores.exit_code == 0 and (tmp_path / "r.csv").read_text().startswith("path,true,pred1,score1")
    wrong = run("probe", key, "--head", "knn", "--penalty", "0.1", "--cache-dir", tmp_path / "c")
    assert wrong.exit_code == 1 and "k-NN head has no penalty" in wrong.output


def test_regression_from_extract_to_predict(tmp_path):
    csv_path = make_regression_csv(tmp_path / "d", n=60)
    cache = tmp_path / "c"
    result = run("extract", csv_path, "-b", TINY, "--workers", 0, "--cache-dir", cache, "--target", "brightness",
                 "--targets", "contrast")
    assert result.exit_code == 0, result.output
    key = next(cache.glob("*.h5")).name[:6]
    probed = run("probe", key, "--cache-dir", cache, "--out", tmp_path / "p")
    assert probed.exit_code == 0, probed.output
    assert "val R² (mean)" in probed.stdout and "head       ridge (regression), penalty" in probed.stdout
    assert "test       R² " in probed.stdout and "brightness" in probed.stdout
    pred = run("predict", tmp_path / "p", csv_path, "--workers", 0, "--out", tmp_path / "pred.csv")
    assert pred.exit_code == 0 and "brightness R² " in pred.stdout and "on 60 images with targets" in pred.stdout
    rows = list(csv.reader((tmp_path / "pred.csv").open()))
    assert rows[0] == ["path", "true_brightness", "pred_brightness", "true_contrast", "pred_contrast"]
    assert len(rows) == 61
    torch_head = run("probe", key, "--head", "torch", "--cache-dir", cache)
    assert torch_head.exit_code == 1 and "closed-form ridge path" in torch_head.output


def test_label_sets_from_extract_to_predict(tmp_path):
    csv_path = make_multilabel_csv(tmp_path / "d", n=60)
    cache = tmp_path / "c"
    assert run("extract", csv_path, "-b", TINY, "--workers", 0, "--cache-dir", cache).exit_code == 0
    key = next(cache.glob("*.h5")).name[:6]
    probed = run("probe", key, "--cache-dir", cache, "--penalties", "0.1,0.001", "--out", tmp_path / "p")
    assert probed.exit_code == 0, probed.output
    assert "val mAP" in probed.stdout and "test       mAP" in probed.stdout and "threshold" in probed.stdout
    pred = run("predict", tmp_path / "p", csv_path, "--workers", 0)
    assert pred.exit_code == 0 and "mAP" in pred.stdout and "img000.png" in pred.stdout
    out = run("predict", tmp_path / "p", csv_path, "--workers", 0, "--out", tmp_path / "pred.csv")
    header = (tmp_path / "pred.csv").read_text().splitlines()[0]
    assert out.exit_code == 0 and header == "path,true,pred,prob_blue,prob_green,prob_red"


def test_targets_need_a_csv_and_heads_are_checked(folder, tmp_path):
    result = run("extract", folder, "-b", TINY, "--workers", 0, "--cache-dir", tmp_path / "c", "--target", "age")
    assert result.exit_code == 1 and "DATA must be a .csv file" in result.output
    bad = run("bench", folder, "--backbones", TINY, "--heads", "torch,lasso", "--cache-dir", tmp_path / "c")
    assert bad.exit_code == 2 and "--heads" in bad.output


def test_bench_heads_side_by_side(folder, tmp_path):
    result = run("bench", folder, "--backbones", f"{TINY},pixels@8", "--heads", "torch,knn,ridge", "--workers", 0,
                 "--cache-dir", tmp_path / "c", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith((TINY, "pixels"))]
    assert len(lines) == 6 and {line.split()[1] for line in lines} == {"torch", "knn", "ridge"}
    board = list(csv.DictReader((tmp_path / "b" / "leaderboard.csv").open()))
    assert {(r["backbone"], r["head"]) for r in board} == {(b, h) for b in (TINY, "pixels@8")
                                                            for h in ("torch", "knn", "ridge")}
    assert all(r["k"] for r in board if r["head"] == "knn") and not any(r["penalty"] for r in board if r["head"] == "knn")
    assert "torch, knn, ridge heads" in (tmp_path / "b" / "leaderboard.md").read_text()
