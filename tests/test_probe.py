import json

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import tests.tiny_backbone  # noqa: F401
from embedcache import extract, load_probe, predict, probe
from embedcache.errors import ConfigError
from embedcache.probe import (
    DEFAULT_PENALTIES,
    SklearnProbe,
    TorchLinearProbe,
    probe_arrays,
    split_for_probe,
    sweep_penalty,
)
from tests.tiny_backbone import TINY, make_image_folder


def blobs(n=300, d=20, k=3, seed=0, sep=3.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


@pytest.mark.parametrize("head", [TorchLinearProbe, SklearnProbe])
def test_estimator_contract(head):
    X, y = blobs()
    est = head(penalty=1e-3)
    assert est.get_params()["penalty"] == 1e-3 and not hasattr(est, "coef_")
    assert est.fit(X, y) is est
    assert est.coef_.shape == (3, 20) and est.intercept_.shape == (3,)
    assert list(est.classes_) == [0, 1, 2]
    proba = est.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    assert est.score(X, y) > 0.95
    assert np.array_equal(est.predict(X), est.classes_[proba.argmax(1)])
    assert clone(est).get_params() == est.get_params()


@pytest.mark.parametrize("head", [TorchLinearProbe, SklearnProbe])
def test_pipeline_and_cross_val_score(head):
    X, y = blobs()
    scores = cross_val_score(make_pipeline(StandardScaler(), head(penalty=1e-3)), X, y, cv=3)
    assert scores.mean() > 0.95


def test_string_labels_and_binary():
    X, y = blobs(k=2)
    labels = np.array(["cat", "dog"])[y]
    est = TorchLinearProbe(penalty=1e-3).fit(X, labels)
    assert set(est.predict(X)) <= {"cat", "dog"} and est.score(X, labels) > 0.95
    sk = SklearnProbe(penalty=1e-3).fit(X, labels)
    assert sk.coef_.shape == (2, 20)
    assert np.mean(sk.predict(X) == est.predict(X)) > 0.97


def test_torch_and_sklearn_heads_solve_the_same_problem():
    X, y = blobs(n=400, d=30, k=4, sep=1.0)
    penalty = 1e-2
    ours = TorchLinearProbe(penalty=penalty, tol=1e-7, max_iter=2000).fit(X, y)
    Xs = (X - X.mean(0)) / X.std(0)
    ref = LogisticRegression(C=1 / (penalty * len(X)), tol=1e-10, max_iter=5000).fit(Xs, y)
    np.testing.assert_allclose(ours.decision_function(X) - ours.decision_function(X).mean(1, keepdims=True),
                               ref.decision_function(Xs) - ref.decision_function(Xs).mean(1, keepdims=True),
                               atol=2e-3)


@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.zeros((4, 3, 2)), [0, 1, 0, 1], "2-D array"),
        (np.array([[np.nan, 1.0], [0.0, 1.0]]), [0, 1], "NaN or infinite values in 1 rows"),
        (np.zeros((0, 3)), [], "no rows"),
        (np.ones((4, 3)), [1, 1, 1, 1], "at least 2 classes"),
        (np.ones((4, 3)), [0, 1], "2 labels for 4 rows"),
    ],
)
def test_malformed_input_is_named(X, y, match):
    with pytest.raises(ConfigError, match=match):
        TorchLinearProbe().fit(X, y)


def test_wrong_dims_at_predict_time():
    X, y = blobs()
    est = TorchLinearProbe().fit(X, y)
    with pytest.raises(ConfigError, match="has 5 features but the probe was fitted on 20"):
        est.predict(np.zeros((2, 5)))


def test_bad_penalty():
    with pytest.raises(ConfigError, match="'penalty' parameter of TorchLinearProbe"):
        TorchLinearProbe(penalty=-1).fit(*blobs())


def test_sweep_is_warm_started_strongest_first_and_ties_go_to_stronger():
    X, y = blobs(sep=10)
    result = sweep_penalty(X[:200], y[:200], X[200:], y[200:], penalties=[1e-4, 1e-2, 1e-3])
    assert result.penalties == [1e-2, 1e-3, 1e-4]
    assert result.best_penalty == 1e-2  # perfectly separable: all tie, the strongest wins
    assert len(DEFAULT_PENALTIES) >= 9


def test_split_for_probe_never_mixes_sets():
    labels = np.repeat(np.arange(3), 20)
    splits = np.array([0] * 45 + [2] * 15)
    rng = np.random.default_rng(0)
    rng.shuffle(splits)
    labels[0] = -1
    parts = split_for_probe(labels, splits, np.array([f"r{i}" for i in range(60)]), val_fraction=0.2, seed=3)
    train, val, test = (set(parts[k].tolist()) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert test == set(np.flatnonzero(splits == 2).tolist()) - {0}
    assert 0 not in train | val | test
    again = split_for_probe(labels, splits, np.array([f"r{i}" for i in range(60)]), val_fraction=0.2, seed=3)
    assert np.array_equal(again["val"], parts["val"])


def test_probe_arrays_never_fits_on_test(monkeypatch):
    X, y = blobs(n=200)
    splits = np.array([0] * 150 + [2] * 50)
    seen = []
    original = TorchLinearProbe.fit

    def spy(self, Xf, yf):
        seen.append(Xf.copy())
        return original(self, Xf, yf)

    monkeypatch.setattr(TorchLinearProbe, "fit", spy)
    probe_arrays(X, y, splits, np.arange(200).astype(str))
    test_rows = {row.tobytes() for row in X[150:]}
    assert seen and all(not ({row.tobytes() for row in Xf} & test_rows) for Xf in seen)


def test_empty_test_split_is_refused():
    X, y = blobs(n=50)
    with pytest.raises(ConfigError, match="test split has no labelled rows"):
        probe_arrays(X, y, np.zeros(50, np.uint8), np.arange(50).astype(str))


@pytest.fixture
def cached(tmp_path):
    folder = make_image_folder(tmp_path / "data", per_class=15, split_dirs=True)
    return folder, extract(folder, backbone=TINY, workers=0, cache_dir=tmp_path / "c", precision="fp32")


@pytest.mark.parametrize("head", ["torch", "sklearn"])
def test_probe_artifact_round_trip_and_predict(cached, tmp_path, head):
    folder, store = cached
    result = probe(store, head=head, out=tmp_path / "p")
    assert result.swept and result.split_sizes == {"train": 26, "val": 4, "test": 30}
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert meta["backbone"]["name"] == TINY and meta["cache_key"] == store.cache_key
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["test"]["top1"] == result.metrics["top1"]
    assert {"top1", "balanced_accuracy", "macro_f1", "per_class_accuracy", "confusion_matrix"} <= set(report["test"])
    loaded = load_probe(tmp_path / "p")
    np.testing.assert_allclose(loaded.predict_proba(store.features.astype(np.float32)),
                               result.estimator.predict_proba(store.features.astype(np.float32)), atol=1e-6)
    out = predict(tmp_path / "p", [str(folder / "test")], workers=0)
    assert out["n_scored"] == 30 and out["accuracy"] == pytest.approx(result.metrics["top1"])
    single = predict(tmp_path / "p", [str(folder / "test" / "a" / "img000.png")], workers=0, top_k=2)
    assert single["rows"][0]["true"] is None and len(single["rows"][0]["pred"]) == 2


def test_probe_from_another_backbone_is_refused(cached, tmp_path):
    _, store = cached
    probe(store, out=tmp_path / "p", penalty=1e-3)
    loaded = load_probe(tmp_path / "p")
    with pytest.raises(ConfigError, match="another backbone setup: weights_sha256"):
        loaded.check_compatible({**store.backbone, "weights_sha256": "0" * 64})


def test_failed_save_leaves_no_half_written_probe(cached, tmp_path, monkeypatch):
    _, store = cached
    import embedcache.artifacts as artifacts

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        probe(store, out=tmp_path / "p", penalty=1e-3)
    assert not (tmp_path / "p" / "probe.json").exists()


@pytest.mark.parametrize("content, match", [(None, "probe.safetensors is missing"), ("{bad", "Cannot read probe metadata")])
def test_broken_probe_directories_get_a_named_error(tmp_path, content, match):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "probe.json").write_text(content or json.dumps({"head": "torch", "penalty": 1.0}))
    with pytest.raises(ConfigError, match=match):
        load_probe(tmp_path / "p")


def test_refit_on_a_longer_array_reuses_the_prepared_rows_and_matches_a_fresh_warm_fit():
    X, labels = blobs(n=500, d=30, k=4, sep=1.0)
    shared = TorchLinearProbe(penalty=1e-2, warm_start=True, tol=1e-6, max_iter=500)
    shared._share_rows(X)
    shared.fit(X[:400], labels[:400])
    prepared = shared._data
    shared.fit(X, labels)
    assert shared._data is prepared  # no second copy of the data
    fresh = TorchLinearProbe(penalty=1e-2, warm_start=True, tol=1e-6, max_iter=500).fit(X[:400].copy(), labels[:400])
    fresh.fit(X.copy(), labels)
    np.testing.assert_allclose(shared.coef_, fresh.coef_, atol=1e-4)
    np.testing.assert_allclose(shared.mean_, X[:400].mean(0), atol=1e-5)  # warm refits keep the first statistics


def test_sweep_estimator_holds_the_chosen_penalty_fit():
    X, labels = blobs(n=600, d=40, k=4, seed=2, sep=0.7)
    result = sweep_penalty(X[:450], labels[:450], X[450:], labels[450:], penalties=[1e1, 1e-1, 1e-3, 1e-5])
    est = result.estimator
    assert est.penalty == result.best_penalty
    predicted = est.predict(X[450:])
    assert np.mean(predicted == labels[450:]) == pytest.approx(result.best_val_accuracy)


def test_iteration_budget_is_fixed_on_large_data_and_grows_on_small_data():
    from embedcache.probe import BUDGET_REFERENCE_SIZE, SMALL_DATA_MAX_ITER, iteration_budget

    assert iteration_budget(4, (54_000, 1280)) == 4
    assert iteration_budget(4, (1_000_000, 1280)) == 4
    assert iteration_budget(4, (27_000, 1280)) == 8  # half the data: twice the iterations, same work
    assert iteration_budget(4, (300, 20)) == SMALL_DATA_MAX_ITER
    assert iteration_budget(4, (BUDGET_REFERENCE_SIZE // 1000, 1000)) == 4


def test_small_sweeps_solve_each_penalty_to_tolerance():
    from embedcache.probe import SMALL_DATA_MAX_ITER, SWEEP_FIRST_MAX_ITER

    X, y = blobs(n=600, d=40, k=4, seed=2, sep=0.7)
    result = sweep_penalty(X[:450], y[:450], X[450:], y[450:], penalties=[1e-1, 1e-2, 1e-3])
    # more iterations than the large-data budgets allow (10, 17, 7 when written), each fit
    # stopping at the tolerance, not at a budget
    assert max(result.iterations) > SWEEP_FIRST_MAX_ITER and max(result.iterations) < SMALL_DATA_MAX_ITER
    for penalty, accuracy in zip(result.penalties, result.val_accuracy, strict=True):
        converged = TorchLinearProbe(penalty=penalty, tol=1e-6, max_iter=1000, data_dtype="bfloat16").fit(X[:450], y[:450])
        assert accuracy == pytest.approx(converged.score(X[450:], y[450:]), abs=1 / 150)


@pytest.mark.parametrize("limit", [0, 1 << 30])
def test_transposed_copy_is_kept_within_its_memory_limit_and_changes_nothing(monkeypatch, limit):
    probe_module = __import__("sys").modules["embedcache.probe"]
    X, y = blobs(n=500, d=30, k=4, sep=1.0)
    monkeypatch.setattr(probe_module, "COLUMNS_MAX_BYTES", limit)
    est = TorchLinearProbe(penalty=1e-2, tol=1e-6, max_iter=500, data_dtype="bfloat16").fit(X, y)
    assert (est._columns is not None) == (limit > 0)
    monkeypatch.setattr(probe_module, "COLUMNS_MAX_BYTES", 1 << 30 if limit == 0 else 0)
    other = TorchLinearProbe(penalty=1e-2, tol=1e-6, max_iter=500, data_dtype="bfloat16").fit(X, y)
    np.testing.assert_allclose(est.coef_, other.coef_, atol=2e-3)


def test_probe_result_does_not_keep_the_training_matrices():
    X, y = blobs(n=200)
    result = probe_arrays(X, y, np.array([0] * 150 + [2] * 50), np.arange(200).astype(str))
    kept = set(vars(result.estimator)) & set(TorchLinearProbe._TRAINING_CACHES)
    assert not kept
    np.testing.assert_array_equal(result.estimator.predict(X[150:]), result.estimator.predict(X[150:].copy()))
    result.estimator.fit(X[:150], y[:150])  # a later warm fit prepares the data again
    assert result.estimator._data is not None


@pytest.mark.parametrize("head", [TorchLinearProbe, SklearnProbe])
def test_reversed_and_read_only_feature_arrays_are_accepted(head):
    X, y = blobs(n=200)
    est = head(penalty=1e-2).fit(X[::-1], y[::-1])
    frozen = X.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(est.predict(X[:, ::-1][:, ::-1]), est.predict(frozen))
    assert est.score(X[::-1], y[::-1]) == pytest.approx(est.score(X, y))


def test_sweep_on_separate_float64_arrays_prepares_the_data_once(monkeypatch):
    probe_module = __import__("sys").modules["embedcache.probe"]
    built = []
    original = probe_module._standardised_matrix
    monkeypatch.setattr(probe_module, "_standardised_matrix", lambda *a, **k: built.append(1) or original(*a, **k))
    X, y = blobs(n=600, d=40, k=4, seed=2, sep=0.7)
    X = X.astype(np.float64)
    sweep_penalty(X[:450].copy(), y[:450], X[450:].copy(), y[450:], penalties=[1e-1, 1e-2, 1e-3])
    assert len(built) == 1


def test_float32_data_keeps_no_transposed_copy():
    X, y = blobs(n=300, d=30, k=3)
    assert TorchLinearProbe(data_dtype="float32").fit(X, y)._columns is None
    assert TorchLinearProbe(data_dtype="bfloat16").fit(X, y)._columns is not None


def test_sweep_restores_the_chosen_fits_own_solver_memory():
    X, y = blobs(n=600, d=40, k=4, seed=2, sep=0.7)
    result = sweep_penalty(X[:450], y[:450], X[450:], y[450:], penalties=[1e1, 1e-1, 1e-3, 1e-5])
    assert result.best_penalty != 1e-5  # else the check below cannot tell the memories apart
    assert result.estimator._memory.penalty == result.best_penalty
