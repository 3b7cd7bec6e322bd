"""Fine-tuning holds out exactly the validation rows the probe chose its penalty on."""

from __future__ import annotations

import json

import pytest

import tests.tiny_backbone  # noqa: F401 - registers the tiny backbone
from embedcache.experiments.artifacts import load_probe
from embedcache.experiments.finetune.setup import open_data, probe_holdout
from embedcache.experiments.protocol import probe, split_for_probe
from embedcache.extraction.extract import extract
from tests.tiny_backbone import TINY, make_image_folder


@pytest.mark.parametrize("val_fraction, seed", [(0.1, 0), (0.3, 2)])
def test_finetune_reuses_the_probes_val_rows(tmp_path, val_fraction, seed):
    folder = make_image_folder(tmp_path / "data", per_class=20, split_dirs=True)
    store = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c", precision="fp32")
    probe(store, val_fraction=val_fraction, seed=seed, penalty=1e-2, out=tmp_path / "p")
    loaded = load_probe(tmp_path / "p")
    assert probe_holdout(loaded) == (val_fraction, seed)
    probe_val = split_for_probe(store.labels, store.splits, store.paths, val_fraction=val_fraction, seed=seed).val
    data = open_data(str(folder), loaded, val_fraction=0.0, test_fraction=0.2, split_seed=0)
    finetune_val = {data.source.samples[i].path for i in data.split.val}
    assert finetune_val == set(store.paths[probe_val].tolist())


def test_an_older_probe_without_the_record_falls_back_to_its_report(tmp_path):
    folder = make_image_folder(tmp_path / "data", per_class=10, split_dirs=True)
    store = extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c", precision="fp32")
    probe(store, val_fraction=0.25, seed=1, penalty=1e-2, out=tmp_path / "p")
    meta_path = tmp_path / "p" / "probe.json"
    meta = json.loads(meta_path.read_text())
    del meta["val_fraction"], meta["seed"], meta["files"]  # as probes of artifact version 1 were
    meta_path.write_text(json.dumps(meta))
    assert probe_holdout(load_probe(tmp_path / "p")) == (0.25, 1)
    report = tmp_path / "p" / "report.json"
    report.write_text(json.dumps({k: v for k, v in json.loads(report.read_text()).items()
                                  if k not in ("val_fraction", "seed")}))
    assert probe_holdout(load_probe(tmp_path / "p")) == (0.1, 0)  # the protocol's defaults
