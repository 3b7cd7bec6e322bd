"""Clear errors from the CLI (issue 14): each is one line on stderr, a non-zero exit and no
traceback; `verify` reports damaged entries with exit 1."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.cli import main
from tests.hostile_helpers import chunk_offset, error_lines, flipped_copy
from tests.store.test_conformance import write_single_file
from tests.tiny_backbone import TINY, make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("cli_data") / "data", per_class=3, split_dirs=True)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *needles, exit_code=1):
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_an_image_size_above_the_limit_is_refused(folder, tmp_path):
    result = invoke("extract", folder, "-b", TINY, "--image-size", 4096, "--workers", 0, "--cache-dir", tmp_path)
    assert_one_line_error(result, "'image_size'", "2048", "4096")
    assert not list(tmp_path.glob("*.h5*"))


def test_a_vit_at_an_unsupported_image_size_is_a_named_error(folder, tmp_path):
    result = invoke("extract", folder, "-b", "vit_b_16", "--weights-tag", "none", "--image-size", 112,
                    "--workers", 0, "--cache-dir", tmp_path)
    assert_one_line_error(result, "vit_b_16", "112x112", "224")


def test_probe_on_cuda_without_a_gpu_is_a_named_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    entry = write_single_file(tmp_path / "cache")
    args = ["probe", entry, "--penalty", "1e-3", "--val-fraction", "0.5", "--cache-dir", tmp_path / "cache"]
    assert invoke(*args, "--device", "cpu").exit_code == 0  # the entry itself is fine
    result = invoke(*args, "--device", "cuda")
    assert_one_line_error(result, "cuda")


def test_a_cache_dir_that_is_a_file_is_a_usage_error(folder, tmp_path):
    not_a_dir = tmp_path / "cachefile"
    not_a_dir.write_text("a file\n")
    result = invoke("extract", folder, "-b", TINY, "--workers", 0, "--cache-dir", not_a_dir)
    # click's usage error for a bad option value: exit 2, the usage line, the hint, one error line
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = error_lines(result.stderr)
    assert lines[0].startswith("Usage: ") and lines[1].startswith("Try ") and len(lines) == 3, lines
    assert lines[2].startswith("Error: ") and "'--cache-dir'" in lines[2], lines
    assert str(not_a_dir) in lines[2] and "is a file" in lines[2], lines
    assert not_a_dir.read_text() == "a file\n"


def test_a_cache_dir_under_a_file_is_one_line(folder, tmp_path):
    not_a_dir = tmp_path / "cachefile"
    not_a_dir.write_text("a file\n")
    result = invoke("extract", folder, "-b", TINY, "--workers", 0, "--cache-dir", not_a_dir / "sub")
    assert_one_line_error(result, str(not_a_dir))
    assert not_a_dir.read_text() == "a file\n"


def test_verify_reports_a_corrupt_entry_and_passes_a_good_one(folder, tmp_path):
    cache = tmp_path / "c"
    made = invoke("extract", folder, "-b", TINY, "--workers", 0, "--store-dtype", "float32", "--cache-dir", cache)
    assert made.exit_code == 0, made.output
    [entry] = cache.glob("*.h5")
    good = invoke("verify", entry.name[:8], "--cache-dir", cache)
    assert good.exit_code == 0, good.output
    assert good.output.startswith("ok") and "problem:" not in good.output

    offset, length = chunk_offset(entry)
    bad = flipped_copy(entry, tmp_path / entry.name, offset + length // 2)
    result = invoke("verify", bad, "--cache-dir", cache)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.output.startswith("FAILED")
    assert [line for line in result.output.splitlines() if line.strip().startswith("problem:")]
    both = invoke("verify", entry, bad, "--cache-dir", cache)
    assert both.exit_code == 1 and both.output.count("FAILED") == 1 and both.output.startswith("ok")
