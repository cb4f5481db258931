"""The inverted file: keys grouped by their nearest k-means centroid (faiss,
the ``[ann]`` extra), so that a search reads only the nearest lists."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ..options import check_int as _check_int


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ImportError("build_ivf needs faiss: pip install 'slot_cpp[ann]' (faiss-cpu)") from None
    return faiss


def inverted_file(keys: np.ndarray, nlist: Optional[int], *, iterations: int, seed: int,
                  train_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The centroids (nlist, dim) float32, the order that groups the keys by
    list, and the lists' offsets in that order (nlist + 1,) int64. k-means
    trains on at most `train_size` keys; `nlist` defaults to 4 sqrt(n)."""
    faiss = _import_faiss()
    n, dim = keys.shape
    nlist = _check_int("nlist", nlist if nlist is not None else max(1, int(4 * math.sqrt(n))), 1)
    if nlist > n:
        raise ValueError(f"nlist ({nlist}) is larger than the datastore ({n} keys)")
    rng = np.random.default_rng(seed)
    sample = keys if n <= train_size else keys[np.sort(rng.choice(n, train_size, replace=False))]
    km = faiss.Kmeans(dim, nlist, niter=_check_int("iterations", iterations, 1), seed=seed,
                      verbose=False, max_points_per_centroid=max(256, train_size // nlist + 1))
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    quantizer = faiss.IndexFlatL2(dim)
    quantizer.add(centroids)
    assign = np.empty(n, dtype=np.int64)
    for a in range(0, n, 65536):
        _, lab = quantizer.search(np.ascontiguousarray(keys[a:a + 65536], dtype=np.float32), 1)
        assign[a:a + 65536] = lab[:, 0]
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=nlist)
    return centroids, order, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
