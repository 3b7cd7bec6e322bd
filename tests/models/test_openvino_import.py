"""How embedcache imports OpenVINO (issue 15): without the model converter that ``import openvino``
loads last (and that sends OpenVINO's telemetry), with ``openvino.convert_model`` still there on
demand, and plainly when a package cannot do without it. These use stand-in ``openvino`` packages
in a new interpreter (no OpenVINO needed); the real package is checked in
tests/extraction/openvino_cases.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: The end of the real package's __init__: the converter is optional.
TOLERANT = """
import sys
Core = object
try:
    from openvino.tools.ovc import convert_model
except ImportError:
    pass
"""
#: A package that cannot do without it.
STRICT = """
from openvino.tools.ovc import convert_model
Core = object
"""
CONVERTER = """
import sys
sys.modules["openvino"].converter_imports = getattr(sys.modules["openvino"], "converter_imports", 0) + 1
def convert_model(*args):
    return "converted"
"""


def fake_openvino(root: Path, init: str) -> Path:
    package = root / "openvino"
    (package / "tools" / "ovc").mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    (package / "tools" / "__init__.py").write_text("")
    (package / "tools" / "ovc" / "__init__.py").write_text(CONVERTER)
    return root


def run(root: Path, code: str) -> dict:
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(root)!r})
        from embedcache.models.openvino_backbone import _import_ov
        {textwrap.indent(textwrap.dedent(code), '        ').strip()}
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_converter_is_held_back_and_convert_model_still_works_on_demand(tmp_path):
    root = fake_openvino(tmp_path, TOLERANT)
    got = run(root, """
        ov = _import_ov()
        before = {"loaded": "openvino.tools.ovc" in sys.modules, "imports": getattr(ov, "converter_imports", 0)}
        result = ov.convert_model()
        print(json.dumps({**before, "result": result, "imports_after": ov.converter_imports,
                          "again": _import_ov() is ov}))
    """)
    assert got == {"loaded": False, "imports": 0, "result": "converted", "imports_after": 1, "again": True}


def test_a_package_that_needs_the_converter_is_imported_plainly(tmp_path):
    root = fake_openvino(tmp_path, STRICT)
    got = run(root, """
        ov = _import_ov()
        print(json.dumps({"imports": ov.converter_imports, "result": ov.convert_model()}))
    """)
    assert got == {"imports": 1, "result": "converted"}


def test_an_openvino_imported_before_is_left_as_it_is(tmp_path):
    root = fake_openvino(tmp_path, TOLERANT)
    got = run(root, """
        import openvino
        ov = _import_ov()
        print(json.dumps({"same": ov is openvino, "imports": ov.converter_imports,
                          "getattr": "__getattr__" in vars(ov)}))
    """)
    assert got == {"same": True, "imports": 1, "getattr": False}


def test_an_openvino_that_cannot_be_imported_is_a_named_error_and_nothing_is_left_held(tmp_path):
    root = fake_openvino(tmp_path, "raise ImportError('libopenvino.so.2600: cannot open shared object file')\n")
    got = run(root, """
        from embedcache.errors import ConfigError
        try:
            _import_ov()
        except ConfigError as exc:
            print(json.dumps({"error": str(exc), "cause": str(exc.__cause__),
                              "left": repr(sys.modules.get("openvino.tools.ovc", "absent"))}))
    """)
    assert 'pip install "embedcache[openvino]"' in got["error"] and "libopenvino" in got["cause"]
    assert got["left"] == "'absent'"  # the holding back is undone
