"""Tests for the finetune command (embedcache.cli.finetune)."""

from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401
from embedcache.cli import main


def test_cli_prints_summary_epochs_and_comparison(probed, tmp_path):
    folder, probe_dir, _ = probed
    result = CliRunner().invoke(main, ["finetune", str(probe_dir), str(folder), "--epochs", "1",
                                       "--batch-size", "8", "--workers", "0", "--device", "cpu",
                                       "--out", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    assert "features.3" in result.output and "trainable" in result.output
    assert "start (probe head)" in result.output and "fine-tuned (best epoch 1 of 1)" in result.output
    bad = CliRunner().invoke(main, ["finetune", str(probe_dir), str(folder), "--unfreeze", "half",
                                    "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "'unfreeze' parameter must be" in bad.output
