"""Tests for embedcache.heads.knn: the blocked search equals a brute-force one, votes follow
DINOv2's rule, k is chosen on validation rows only, and the estimator contract."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from embedcache.errors import ConfigError
from embedcache.heads import knn as knn_module
from embedcache.heads.knn import KNNProbe, cosine_topk, select_k, vote
from tests.heads.helpers import blobs


def brute_force(queries, references, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    r = references / np.linalg.norm(references, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ r.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.mark.parametrize("blocks", [(7, 5, 11), (4, 64, 3), (1000, 1000, 1000)])
def test_blocked_topk_equals_brute_force(blocks):
    rng = np.random.default_rng(0)
    queries, references = rng.normal(size=(37, 16)), rng.normal(size=(53, 16))
    query_block, reference_block, query_chunk = blocks
    sims, index = cosine_topk(queries, references, 9, data_dtype="float32", query_block=query_block,
                              reference_block=reference_block, query_chunk=query_chunk)
    expected_sims, expected_index = brute_force(queries, references, 9)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(sims, expected_sims, atol=1e-5)


def test_bf16_products_find_nearly_the_same_neighbours():
    rng = np.random.default_rng(1)
    queries, references = rng.normal(size=(50, 64)), rng.normal(size=(400, 64))
    sims, _ = cosine_topk(queries, references, 10, data_dtype="bfloat16", reference_block=64)
    exact, _ = brute_force(queries, references, 10)
    np.testing.assert_allclose(sims, exact, atol=1e-2)


def test_float16_input_and_zero_rows():
    references = np.eye(4, 8, dtype=np.float16)
    references[3] = 0
    sims, index = cosine_topk(references[:3], references, 1, data_dtype="float32")
    assert index[:, 0].tolist() == [0, 1, 2] and np.allclose(sims[:, 0], 1.0)


def test_votes_are_temperature_softmax_over_the_k_neighbours():
    sims = np.array([[0.9, 0.8, 0.1]], np.float32)
    labels = np.array([[1, 0, 1]])
    proba = vote(sims, labels, 2, k=2, temperature=0.1)
    w = np.exp(np.array([0.9, 0.8]) / 0.1)
    np.testing.assert_allclose(proba, [[w[1] / w.sum(), w[0] / w.sum()]], rtol=1e-5)
    assert np.isclose(vote(sims, labels, 2, k=3, temperature=0.1).sum(), 1.0)


def test_high_temperature_matches_sklearn_majority_vote():
    X, y = blobs(n=400, d=10, k=3, sep=1.0)
    X_train, y_train, X_test = X[:300], y[:300], X[300:]
    ours = KNNProbe(k=15, temperature=1e6, data_dtype="float32").fit(X_train, y_train)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    theirs = KNeighborsClassifier(n_neighbors=15, metric="cosine", algorithm="brute").fit(unit(X_train), y_train)
    agree = np.mean(ours.predict(X_test) == theirs.predict(unit(X_test)))
    assert agree > 0.97  # only exact vote ties may break differently


def test_estimator_contract_and_from_references():
    X, y = blobs(n=200, d=12, k=3)
    labels = np.array(["a", "b", "c"])[y]
    probe = KNNProbe(k=5, data_dtype="float32").fit(X, labels)
    assert probe.score(X, labels) > 0.95 and probe.predict_proba(X).shape == (200, 3)
    assert probe.kneighbors(X[:3], k=2)[1].shape == (3, 2)
    again = KNNProbe.from_references(references=X, labels=labels, classes=probe.classes_, k=5, data_dtype="float32")
    np.testing.assert_array_equal(again.predict(X), probe.predict(X))
    assert KNNProbe(k=500, data_dtype="float32").fit(X, labels).predict(X[:2]).shape == (2,)  # k capped


@pytest.mark.parametrize("params, match", [({"k": 0}, "'k' parameter"), ({"temperature": -1.0}, "'temperature'"),
                                           ({"data_dtype": "int8"}, "'data_dtype'")])
def test_bad_parameters_are_named(params, match):
    X, y = blobs(n=20, d=3)
    with pytest.raises(ConfigError, match=match):
        KNNProbe(**params).fit(X, y)


def test_k_is_chosen_on_validation_rows_only(monkeypatch):
    X, y = blobs(n=300, d=8, k=3, sep=1.5)
    seen = []
    original = knn_module.cosine_topk

    def spy(queries, references, k, **kwargs):
        seen.append((np.array(queries, copy=True), np.array(references, copy=True)))
        return original(queries, references, k, **kwargs)

    monkeypatch.setattr(knn_module, "cosine_topk", spy)
    selection = select_k(X[:200], y[:200], X[200:250], y[200:250], ks=(1, 5, 500), data_dtype="float32")
    assert selection.values == [1, 5, 200] and selection.parameter == "k"  # 500 capped at 200 references
    assert selection.best_value in selection.values and selection.best_score == max(selection.val_scores)
    (queries, references), = seen  # one search serves every k
    assert np.array_equal(queries, X[200:250]) and np.array_equal(references, X[:200])
    assert not {r.tobytes() for r in X[250:]} & {r.tobytes() for r in references}


def test_cosine_topk_refuses_bad_k():
    with pytest.raises(ConfigError, match="between 1 and the number of references"):
        cosine_topk(np.ones((2, 3)), np.ones((2, 3)), 3)


def test_search_threads_memory_is_bounded_by_tiles(monkeypatch):
    # the largest similarity tile is query_block x reference_block, whatever the reference count
    shapes = []
    original = torch.Tensor.topk

    def spy(self, *args, **kwargs):
        shapes.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", spy)
    rng = np.random.default_rng(0)
    cosine_topk(rng.normal(size=(30, 4)), rng.normal(size=(1000, 4)), 3, data_dtype="float32", query_block=8,
                reference_block=100)
    assert max(a * b for a, b in shapes) <= 8 * 100
