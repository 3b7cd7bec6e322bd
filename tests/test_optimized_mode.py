"""Checks are explicit raises, never ``assert`` (issue 14): under ``python -O`` the threshold and
protocol checks still fire, and the package holds no assert statement."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from tests.hostile_helpers import REPO, subprocess_env
from tests.tiny_backbone import make_image_folder

PACKAGE = REPO / "embedcache"

_SCRIPT = """
import json, sys
import numpy as np
assert False, "this script must run under python -O"
import tests.tiny_backbone
from embedcache.errors import ConfigError, TooManyErrorsError
from embedcache.experiments.protocol import split_for_probe
from embedcache.extraction.extract import extract
from embedcache.splits import Split
out = {}
try:
    extract(sys.argv[1], backbone="tiny-test", workers=0, batch_size=4, cache_dir=sys.argv[2], max_errors=0)
    out["max_errors"] = None
except Exception as exc:
    out["max_errors"] = [type(exc).__name__, str(exc)]
extract(sys.argv[1], backbone="tiny-test", workers=0, batch_size=4, cache_dir=sys.argv[3])  # records 1 failure
try:
    extract(sys.argv[1], backbone="tiny-test", workers=0, batch_size=4, cache_dir=sys.argv[3], max_errors=0)
    out["hit"] = None
except Exception as exc:
    out["hit"] = [type(exc).__name__, str(exc)]
# one train image per class: a 0.1 hold-out of train leaves val empty
labels = np.array([0, 1, 0, 1])
splits = np.array([Split.TRAIN, Split.TRAIN, Split.TEST, Split.TEST], np.uint8)
try:
    split_for_probe(labels, splits, np.array(["a", "b", "c", "d"]), val_fraction=0.1)
    out["split"] = None
except Exception as exc:
    out["split"] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""


def test_threshold_and_protocol_checks_fire_under_python_O(tmp_path):
    folder = make_image_folder(tmp_path / "data", per_class=3, split_dirs=True)
    (folder / "train" / "a" / "empty.png").write_bytes(b"")
    result = subprocess.run([sys.executable, "-O", "-c", _SCRIPT, str(folder), str(tmp_path / "c"),
                             str(tmp_path / "hit")], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    name, message = out["max_errors"]
    assert name == "TooManyErrorsError" and "more than max_errors=0" in message
    name, message = out["hit"]  # a cache hit's recorded failure counts too
    assert name == "TooManyErrorsError" and "1 images failed to decode, more than max_errors=0" in message
    name, message = out["split"]
    assert name == "ConfigError" and "val split has no labelled rows" in message


def test_the_package_has_no_assert_statements():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Assert):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, f"assert statements vanish under python -O: {found}"
