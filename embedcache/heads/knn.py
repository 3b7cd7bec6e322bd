"""``KNNProbe``: the k-nearest-neighbour probe of self-supervised evaluation (DINOv2's ``knn.py``).

Features are L2-normalised, similarity is the cosine, and the ``k`` most similar references vote
with weights ``softmax(sim / temperature)`` over those ``k`` (DINOv2 normalises over the largest
``k`` of its grid; the argmax is the same, and these votes are probabilities). ``k`` is chosen on
validation rows from a grid (:func:`select_k`): one top-``max(k)`` search serves every ``k``.

The search (:func:`cosine_topk`) is blocked: references are normalised a block at a time (no
normalised copy of the reference matrix is kept) and each (query block x reference block)
similarity tile is reduced to its top-k at once and merged into a running top-k. Memory is
bounded by the tiles, whatever the number of references. On CPUs with native bf16 (AMX /
AVX512-BF16) and on CUDA the products run in bf16 with float32 accumulation and float32 scores
(inputs rounded to bf16 move a cosine by about 1e-4); elsewhere in float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from embedcache.errors import ConfigError
from embedcache.heads.selection import Selection, best_index
from embedcache.heads.validation import validate_fit_input, validate_predict_input
from embedcache.runtime import cpu_has_native_bf16

#: The k grid of DINOv2's k-NN evaluation.
DEFAULT_KS = (10, 20, 100, 200)
#: DINOv2's vote temperature.
DEFAULT_TEMPERATURE = 0.07
#: Queries per similarity tile.
QUERY_BLOCK_ROWS = 2048
#: References per similarity tile (2048 x 16384 float32 scores: 128 MiB).
REFERENCE_BLOCK_ROWS = 16384
#: Queries whose running top-k is kept at once (bounds the state for very many queries).
QUERY_CHUNK_ROWS = 65536
DATA_DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(data_dtype: str, device: str = "cpu") -> torch.dtype:
    """``auto``: bf16 where bf16 products are native (CUDA, AMX/AVX512-BF16 CPUs), else float32."""
    if data_dtype not in DATA_DTYPES:
        raise ConfigError(f"The 'data_dtype' parameter must be one of {list(DATA_DTYPES)}. Got {data_dtype!r}.")
    if data_dtype == "auto":
        native = str(device).startswith("cuda") or cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, data_dtype)


def _normalised(block: np.ndarray, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Rows of ``block`` scaled to unit L2 norm (a zero row stays zero), as ``dtype``."""
    if block.dtype == np.float16:  # torch converts half ~8x faster than numpy
        rows = torch.from_numpy(np.ascontiguousarray(block)).to(device).float()
    else:
        rows = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(device)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min_(1e-12)
    return (rows / norms).to(dtype)


def cosine_topk(queries: np.ndarray, references: np.ndarray, k: int, *, data_dtype: str = "auto",
                device: str = "cpu", query_block: int = QUERY_BLOCK_ROWS,
                reference_block: int = REFERENCE_BLOCK_ROWS,
                query_chunk: int = QUERY_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` references most cosine-similar to each query, blocked (see the module docstring).

    Args:
        queries: ``(m, d)`` features; references: ``(n, d)`` features (float16 or float32).
        k: neighbours per query (at most ``n``).
        data_dtype: ``auto``, ``float32`` or ``bfloat16`` for the products.
        device: where the products run.
        query_block, reference_block: the tile shape; query_chunk: queries per running top-k.

    Returns:
        ``(similarities (m, k) float32, indices (m, k) int64)``, most similar first.
    """
    dtype = resolve_dtype(data_dtype, device)
    m, n = len(queries), len(references)
    if not 1 <= k <= n:
        raise ConfigError(f"k must be between 1 and the number of references ({n}). Got {k!r}.")
    sims_out = np.empty((m, k), np.float32)
    index_out = np.empty((m, k), np.int64)
    for chunk_start in range(0, m, query_chunk):
        chunk = _normalised(queries[chunk_start:chunk_start + query_chunk], dtype, device)
        best = torch.full((len(chunk), k), -math.inf, device=device)
        best_index_ = torch.zeros((len(chunk), k), dtype=torch.int64, device=device)
        for ref_start in range(0, n, reference_block):
            refs = _normalised(references[ref_start:ref_start + reference_block], dtype, device)
            take = min(k, len(refs))
            for begin in range(0, len(chunk), query_block):
                tile = (chunk[begin:begin + query_block] @ refs.T).float()
                values, where = tile.topk(take, dim=1)
                if ref_start == 0 and take == k:
                    best[begin:begin + query_block], best_index_[begin:begin + query_block] = values, where
                    continue
                merged = torch.cat([best[begin:begin + query_block], values], dim=1)
                merged_index = torch.cat([best_index_[begin:begin + query_block], where + ref_start], dim=1)
                values, pick = merged.topk(k, dim=1)
                best[begin:begin + query_block] = values
                best_index_[begin:begin + query_block] = merged_index.gather(1, pick)
        sims_out[chunk_start:chunk_start + len(chunk)] = best.cpu().numpy()
        index_out[chunk_start:chunk_start + len(chunk)] = best_index_.cpu().numpy()
    return sims_out, index_out


def vote(similarities: np.ndarray, neighbour_labels: np.ndarray, n_classes: int, *, k: int,
         temperature: float) -> np.ndarray:
    """Class probabilities from the first ``k`` neighbours: ``softmax(sim / T)`` weights summed
    per class. ``similarities`` and ``neighbour_labels`` (class positions) are ``(m, >=k)``."""
    sims = torch.from_numpy(np.ascontiguousarray(similarities[:, :k], np.float32))
    weights = torch.softmax(sims / temperature, dim=1)
    labels = torch.from_numpy(np.ascontiguousarray(neighbour_labels[:, :k], np.int64))
    proba = torch.zeros((len(sims), n_classes), dtype=torch.float32)
    return proba.scatter_add_(1, labels, weights).numpy()


def check_k(owner: str, k: Any) -> int:
    """``k`` must be a positive int."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"The 'k' parameter of {owner} must be a positive int. Got {k!r}.")
    return int(k)


def check_temperature(owner: str, temperature: Any) -> float:
    """The vote temperature must be a finite float > 0."""
    ok = (not isinstance(temperature, bool) and isinstance(temperature, (int, float))
          and math.isfinite(temperature) and temperature > 0)
    if not ok:
        raise ConfigError(f"The 'temperature' parameter of {owner} must be a finite float > 0. Got {temperature!r}.")
    return float(temperature)


class KNNProbe(ClassifierMixin, BaseEstimator):
    """Cosine k-NN classifier with temperature-weighted votes (see the module docstring).

    Args:
        k: neighbours that vote (at most the number of references).
        temperature: vote weights are ``softmax(similarity / temperature)``.
        data_dtype: ``auto`` (bf16 where native), ``float32`` or ``bfloat16`` for the products.
        device: ``cpu`` or ``cuda``.

    Attributes:
        classes_, references_ (the fitted rows, as given: no normalised copy), labels_ (class
        position of each reference), n_features_in_, fit_seconds_.
    """

    def __init__(self, k: int = 20, *, temperature: float = DEFAULT_TEMPERATURE, data_dtype: str = "auto",
                 device: str = "cpu") -> None:
        self.k = k
        self.temperature = temperature
        self.data_dtype = data_dtype
        self.device = device

    def fit(self, X: Any, y: Any) -> KNNProbe:
        """Keep ``X`` as the references and ``y`` as their labels; returns self."""
        started = time.perf_counter()
        check_k("KNNProbe", self.k)
        check_temperature("KNNProbe", self.temperature)
        resolve_dtype(self.data_dtype, self.device)
        X, y = validate_fit_input(self, X, y)
        self.classes_, labels = np.unique(y, return_inverse=True)
        self.references_, self.labels_ = X, labels.astype(np.int64).reshape(-1)
        self.fit_seconds_ = time.perf_counter() - started
        return self

    @classmethod
    def from_references(cls, *, references: np.ndarray, labels: np.ndarray, classes: np.ndarray,
                        **params: Any) -> KNNProbe:
        """A fitted probe from reference rows and their labels (values in ``classes``): how an
        artifact is loaded, with the rows read from the cache entry it names."""
        probe = cls(**params)
        probe.classes_ = np.asarray(classes)
        position = {c: i for i, c in enumerate(probe.classes_.tolist())}
        probe.labels_ = np.array([position[c] for c in np.asarray(labels).tolist()], dtype=np.int64)
        probe.references_ = references
        probe.n_features_in_, probe.fit_seconds_ = int(references.shape[1]), 0.0
        return probe

    def kneighbors(self, X: Any, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, reference indices)`` of the ``k`` (default ``self.k``) nearest references."""
        check_is_fitted(self, "references_")
        X = validate_predict_input(self, X)
        k = min(check_k("KNNProbe", self.k if k is None else k), len(self.references_))
        return cosine_topk(X, self.references_, k, data_dtype=self.data_dtype, device=self.device)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Vote shares ``(n, n_classes)`` (columns ordered as ``classes_``)."""
        sims, index = self.kneighbors(X)
        temperature = check_temperature("KNNProbe", self.temperature)
        return vote(sims, self.labels_[index], len(self.classes_), k=sims.shape[1], temperature=temperature)

    def predict(self, X: Any) -> np.ndarray:
        proba = self.predict_proba(X)
        return np.asarray(self.classes_)[np.argmax(proba, axis=1)]


def k_grid(ks: Sequence[int], n_references: int) -> list[int]:
    """The grid checked, capped at the number of references and deduplicated, ascending."""
    values = [check_k("the k grid", k) for k in ks]
    if not values:
        raise ConfigError("The 'ks' grid is empty; give at least one k (e.g. 10,20,100,200).")
    return sorted({min(k, n_references) for k in values})


def select_k(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, *,
             ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
             data_dtype: str = "auto", device: str = "cpu") -> Selection:
    """Val top-1 of every ``k`` of the grid, from one top-``max(k)`` search of the val rows among
    the train rows; the best wins, ties going to the larger k (the smoother vote)."""
    started = time.perf_counter()
    temperature = check_temperature("select_k", temperature)
    grid = k_grid(ks, len(X_train))
    classes, labels = np.unique(np.asarray(y_train), return_inverse=True)
    sims, index = cosine_topk(X_val, X_train, grid[-1], data_dtype=data_dtype, device=device)
    neighbour_labels = labels.reshape(-1)[index]
    y_val = np.asarray(y_val)
    scores = []
    for k in grid:
        proba = vote(sims, neighbour_labels, len(classes), k=k, temperature=temperature)
        scores.append(float(np.mean(classes[np.argmax(proba, axis=1)] == y_val)))
    chosen = best_index(scores, ties="last")
    return Selection("k", "top1", list(grid), scores, time.perf_counter() - started, grid[chosen], scores[chosen],
                     {"temperature": temperature})
