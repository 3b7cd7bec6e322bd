"""Tests for the bench and fewshot commands (embedcache.cli.bench)."""

import pytest
from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401
from embedcache.cli import main
from embedcache.extraction.extract import extract
from tests.tiny_backbone import TINY, make_image_folder


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=12, split_dirs=True)


def test_bench_cli_prints_the_table(folder, tmp_path):
    result = CliRunner().invoke(main, ["bench", str(folder), "--backbones", f"{TINY},pixels@8",
                                       "--workers", "0", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "test top-1" in result.stdout and "pixels@8" in result.stdout


def test_fewshot_cli(folder, tmp_path):
    store = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path)
    result = CliRunner().invoke(main, ["fewshot", str(store.path), "--shots", "1,2", "--seeds", "3"])
    assert result.exit_code == 0, result.output
    assert "k per class" in result.stdout and "3 seeds" in result.stdout
