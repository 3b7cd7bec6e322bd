"""A probe directory written as a unit and checked as one.

The weights file (``probe.safetensors``), ``report.json`` and ``probe.json`` are
all written to fresh temporary names first, then renamed into place, ``probe.json`` last: a full
disk leaves the previous probe untouched. ``probe.json`` records the sha256 and size of every
other file (a fine-tuned ``backbone.safetensors`` too) and the tensor shapes. Loading checks them before anything is used, so a crash between two renames, a
swapped or symlinked weights file, or a ``probe.json`` that no longer matches its weights is
refused with a named error instead of being used. A ``probe.joblib`` (what earlier versions wrote
for the sklearn head) is checked the same way before it is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.errors import ConfigError
from embedcache.fileio import named_write_errors, publish, sha256_file, stage_write

#: Version of the probe directory layout (probe.json ``artifact_version``).
ARTIFACT_VERSION = 2
#: The manifest: written last, it vouches for the other files.
META = "probe.json"
REPORT = "report.json"
#: Key of probe.json listing ``{file: {"sha256": ..., "bytes": ...}}``.
FILES_KEY = "files"


def _record(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def tensors_bytes(tensors: dict[str, Any], meta: dict[str, Any]) -> tuple[bytes, dict[str, list[int]]]:
    """safetensors bytes of ``tensors`` (integers as int64, the rest float32) with the classes and
    class names also in the file's own metadata; and the shapes, for probe.json."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v, dtype=np.int64 if np.issubdtype(np.asarray(v).dtype, np.integer)
                                      or k == "classes" else np.float32) for k, v in tensors.items()}
    header = {"classes": json.dumps([int(c) for c in arrays["classes"]]),
              "class_names": json.dumps(list(meta.get("class_names", [])))} if "classes" in arrays else {}
    return save(arrays, metadata=header), {k: list(v.shape) for k, v in arrays.items()}


def write_probe_dir(out: Path, meta: dict[str, Any], report: dict[str, Any], *, tensors: dict[str, Any],
                    files: dict[str, dict[str, Any]] | None = None,
                    pictures: dict[str, bytes | None] | None = None) -> None:
    """Write probe.safetensors (``tensors``), report.json, ``pictures`` (name -> PNG bytes, None
    to skip; not read on load, so not in the manifest) and last probe.json with the sha256 of
    each (plus any already written ``files``, such as a fine-tuned backbone). Every file is
    staged before any is replaced, so a full disk leaves the previous probe as it was. Nothing
    here writes pickle; ``probe.joblib`` directories of earlier versions still load."""
    with named_write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    listed = dict(files or {})
    meta = dict(meta)
    contents: dict[str, bytes] = {}
    contents["probe.safetensors"], meta["tensor_shapes"] = tensors_bytes(tensors, meta)
    contents[REPORT] = json.dumps(report, indent=2).encode()
    listed.update({name: _record(data) for name, data in contents.items()})
    meta[FILES_KEY] = listed
    contents.update({name: data for name, data in (pictures or {}).items() if data is not None})
    contents[META] = json.dumps(meta, indent=2).encode()  # last: it vouches for the others
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in contents.items():  # everything written before anything is replaced
            staged.append((stage_write(out / name, data), out / name))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    publish(staged)


def record_file(path: Path) -> dict[str, Any]:
    """The manifest record of a file written separately (checked by :func:`check_probe_files`)."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def check_probe_files(directory: Path, meta: dict[str, Any]) -> None:
    """Every file probe.json lists: a plain file (not a symlink), of the recorded size and sha256.

    Raises:
        ConfigError: naming the file and what is wrong with it.
    """
    for name, record in (meta.get(FILES_KEY) or {}).items():
        path = directory / name
        if Path(name).name != name:
            raise ConfigError(f"{str(directory / META)!r} lists {name!r}, which is not a file of the directory.")
        if not path.exists() and not path.is_symlink():
            raise ConfigError(f"Incomplete probe directory {str(directory)!r}: {name} is missing.")
        if path.is_symlink() or not path.is_file():
            raise ConfigError(f"{str(path)!r} is a symlink or not a regular file; a probe's files must be its own. "
                              f"Re-run `embedcache probe ... --out {directory}`.")
        if path.stat().st_size != record.get("bytes") or sha256_file(path) != record.get("sha256"):
            raise ConfigError(
                f"{str(path)!r} does not match {META} (size or sha256 differs): the probe directory is "
                f"inconsistent (an interrupted write, or a file swapped in from elsewhere). Re-run "
                f"`embedcache probe ... --out {directory}`."
            )


def load_tensors(path: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The tensors of a probe's safetensors file (listed in probe.json and already checked by
    :func:`check_probe_files`), checked against probe.json by :func:`check_tensors`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - not a dict
            header = handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file: name it, never a traceback
        raise ConfigError(f"Cannot load probe weights {str(path)!r} ({exc}).") from exc
    check_tensors(path, tensors, meta, header)
    return tensors


def check_tensors(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any], header: dict[str, str]) -> None:
    """The loaded tensors agree with probe.json: shapes, classes and class names."""
    shapes = meta.get("tensor_shapes")
    if shapes is not None and {k: list(v.shape) for k, v in tensors.items()} != shapes:
        raise ConfigError(f"{str(path)!r} holds tensors of other shapes than {META} records.")
    if "classes" in tensors and [int(c) for c in tensors["classes"]] != [int(c) for c in meta.get("classes", [])]:
        raise ConfigError(f"The classes in {META} differ from those in {str(path)!r}: the metadata was edited "
                          f"or belongs to another probe. Re-run `embedcache probe`.")
    if "class_names" in header and json.loads(header["class_names"]) != list(meta.get("class_names", [])):
        raise ConfigError(f"The class names in {META} differ from those recorded in {str(path)!r}: the metadata "
                          f"was edited or belongs to another probe. Re-run `embedcache probe`.")


def read_meta(directory: Path) -> dict[str, Any]:
    """probe.json of a probe directory, parsed."""
    meta_path = directory / META
    if not meta_path.is_file():
        raise ConfigError(f"No probe at {str(directory)!r}: expected a directory with {META} "
                          f"(written by `embedcache probe ENTRY --out DIR`).")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot read probe metadata {str(meta_path)!r} ({exc}).") from exc
    if not isinstance(meta, dict):
        raise ConfigError(f"{str(meta_path)!r} is not a probe's metadata (not a JSON object).")
    return meta
