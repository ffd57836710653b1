"""Cell-level integration metrics: did the batches mix, and did biology survive?

Everything here runs on one exact kNN graph per embedding (our kNN kernel,
Euclidean, self excluded), built on a seeded sample of at most ``max_cells``
cells: a cell's neighbours are searched among the sampled cells, as when scIB
metrics are run on a subsample. The sample is drawn in Polars' streaming
engine (the ``max_cells`` cells with the smallest seeded hash of their row
number), so a LazyFrame over a Parquet lake is never held whole. The
silhouettes (O(n²) distances, computed in float64 blocks of at most 32 MiB,
never the whole n × n matrix) use a seeded sub-sample of at most
``silhouette_cells`` of those cells, the same for every embedding.

Metric definitions (``n_neighbors`` = 30 unless named):

- ``batch_entropy``: mean over cells of the natural-log entropy of the batch
  labels among the cell's 30 nearest neighbours: the reference method's
  ``mix``. ``batch_entropy_norm`` divides it by ln B (B batches), so 1 is
  perfect mixing.
- ``ilisi`` / ``clisi``: LISI with perplexity 30 exactly as harmonypy's
  ``compute_lisi`` (90 neighbours, Gaussian weights calibrated to the
  perplexity), summarised as scib-metrics does: the median, scaled to [0, 1]:
  iLISI (median − 1)/(B − 1) (1 = mixed), cLISI (C − median)/(C − 1)
  (1 = labels kept apart).
- ``label_purity``: mean fraction of a cell's 30 neighbours sharing its label.
- ``label_transfer``: leave-one-batch-out accuracy: each batch's cells are
  classified by the majority label of their 30 nearest cells in the *other*
  batches (ties to the first label in sorted order, as scikit-learn's
  ``KNeighborsClassifier``). Cells whose label no other batch has count as
  misclassified.
- ``graph_connectivity``: scib's definition on scanpy's default graph
  (15 neighbours including the cell itself, i.e. 14 others, symmetrised): per
  label, the fraction of its cells in the largest connected component of the
  graph restricted to that label; the mean over labels.
- ``silhouette_label``: scib-metrics' ``silhouette_label`` (rescale=True,
  src/scib_metrics/metrics/_silhouette.py): (mean over cells of
  scikit-learn's Euclidean ``silhouette_samples`` of the labels + 1) / 2.
  A cell alone in its label, or with equal mean distances to its own and the
  nearest other label (0/0), scores 0, as both implementations'
  ``nan_to_num``.
- ``silhouette_batch``: scib-metrics' ``silhouette_batch`` (same file,
  defaults: rescale, Euclidean, nearest other batch): for each label, the
  silhouette of the *batches* among that label's cells, 1 − |s| per cell,
  averaged per label, then over labels (each label weighs the same). Labels
  whose cells come from one batch, or each from a different batch, are
  skipped, as there. 1 = the batches are mixed within every label.
- ``isolated_labels``: scib-metrics' ``isolated_labels`` (silhouette variant,
  rescale=True, iso_threshold=None; src/scib_metrics/metrics/_isolated_labels.py):
  the isolated labels are those present in the fewest batches (counting the
  distinct (label, batch) pairs); each scores the mean over its cells of the
  (s + 1)/2 label silhouette (against all labels, the per-cell values of
  ``silhouette_label``); the score is the mean over isolated labels.
- ``nmi`` / ``ari``: scib-metrics' ``nmi_ari_cluster_labels_kmeans``
  (src/scib_metrics/metrics/_nmi_ari.py): k-means of the embedding with k =
  the number of labels, then scikit-learn's ``normalized_mutual_info_score``
  (arithmetic mean of the entropies) and ``adjusted_rand_score`` of the
  clusters against the labels, re-implemented here with their special cases.
  The k-means is our own :func:`polars_singlecell.kmeans_centroids` (see
  :func:`nmi_ari_cluster_labels_kmeans` for why and how it matches).
- ``bio_conservation``, ``batch_correction``, ``overall``: scIB's aggregate as
  scib-metrics' ``Benchmarker.get_results`` (src/scib_metrics/benchmark/_core.py,
  unscaled): each group the plain mean of its metrics (NaN ones left out, as
  pandas' ``mean``), ``overall`` = 0.6 × bio conservation + 0.4 × batch
  correction. The groups are scIB's, over the metrics we have
  (:data:`BIO_CONSERVATION`, :data:`BATCH_CORRECTION`): bio conservation =
  ``isolated_labels``, ``nmi``, ``ari``, ``silhouette_label``, ``clisi``;
  batch correction = ``silhouette_batch``, ``ilisi``, ``graph_connectivity``
  (scIB files graph connectivity under batch correction; its kBET and PCR
  comparison we do not compute). This is the Benchmarker's grouping up to
  scib-metrics 0.5.5; from 0.5.6 its default swaps ``silhouette_batch`` for
  BRAS, which we do not compute. ``batch_entropy(_norm)``, ``label_purity``,
  ``label_transfer`` and the start/result metrics are reported but do not
  count: they are not scIB metrics.
- Between a start and a result embedding of the same cells, the reference
  method's ``overlap0`` (mean fraction of shared 30-NN on 5000 sampled cells),
  ``strain`` (mean over the start's 20-NN edges of clip(d_new/d_0 − 1, −1, 1)²;
  edges of length 0 are skipped, their ratio is undefined) and ``tw``
  (scikit-learn's trustworthiness, k = 30, on 2500 sampled cells).

Examples
--------
>>> import numpy as np, polars as pl, polars_singlecell as psc
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(600, 5)).astype(np.float32)
>>> cells = pl.DataFrame({
...     "batch": np.repeat(["a", "b"], 300),
...     "label": np.tile(["t", "u"], 300),
...     "X_pca": pl.Series(x, dtype=pl.Array(pl.Float32, 5)),
...     "X_shift": pl.Series(x + np.repeat([[0.0], [3.0]], 300, axis=0).astype(np.float32), dtype=pl.Array(pl.Float32, 5)),
... })
>>> table = psc.metrics.evaluate(cells, ["X_pca", "X_shift"], batch_key="batch", label_key="label")
>>> table.columns
['embedding', 'metric', 'value']
>>> m = {(e, k): v for e, k, v in table.iter_rows()}
>>> m["X_pca", "batch_entropy_norm"] > 0.9 > m["X_shift", "batch_entropy_norm"]
True
>>> m["X_pca", "silhouette_batch"] > 0.9 > m["X_shift", "silhouette_batch"]
True
>>> m["X_shift", "overall"] == 0.6 * m["X_shift", "bio_conservation"] + 0.4 * m["X_shift", "batch_correction"]
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from polars_singlecell import _internal
from polars_singlecell._arrays import categories as _categories
from polars_singlecell._arrays import codes as _codes
from polars_singlecell._arrays import matrix as _matrix
from polars_singlecell._arrays import series as _series
from polars_singlecell._checks import renamed

__all__ = [
    "BATCH_CORRECTION",
    "BIO_CONSERVATION",
    "aggregate",
    "batch_entropy",
    "clisi",
    "evaluate",
    "graph_connectivity",
    "ilisi",
    "isolated_labels",
    "label_purity",
    "label_transfer",
    "lisi",
    "neighbors",
    "nmi_ari_cluster_labels_kmeans",
    "overlap0",
    "silhouette_batch",
    "silhouette_label",
    "strain",
    "trustworthiness",
]


# ------------------------------------------------------------------ inputs


def _positive_k(k: object, what: str = "n_neighbors") -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{what} must be a positive integer, got {k!r}")


def _check_k(k: int, n: int, what: str = "n_neighbors") -> None:
    _positive_k(k, what)
    if k >= n:
        raise ValueError(f"{what}={k} needs more than {k} cells, got {n}: lower {what} or pass more cells")


# -------------------------------------------------------------- the graph


def neighbors(x: object, n_neighbors: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``n_neighbors`` nearest other cells of every cell.

    Parameters
    ----------
    x : numpy.ndarray or polars.Series
        The embedding, ``(n_cells, d)`` (any float dtype, read as float32) or
        an ``Array(Float32, d)`` Series; finite.
    n_neighbors : int, default 30
        Neighbours per cell, 1 ≤ ``n_neighbors`` < ``n_cells``.

    Returns
    -------
    indices : numpy.ndarray
        ``(n_cells, n_neighbors)`` int64, nearest first, self excluded (a
        duplicate of the cell may be among them).
    distances : numpy.ndarray
        ``(n_cells, n_neighbors)`` float32 Euclidean distances, ascending.

    Examples
    --------
    >>> import numpy as np, polars_singlecell as psc
    >>> idx, dist = psc.metrics.neighbors(np.array([[0.0], [1.0], [3.0]]), 1)
    >>> idx.ravel().tolist(), dist.ravel().tolist()
    ([1, 0, 1], [1.0, 1.0, 2.0])
    """
    a = _matrix(x)
    n = a.shape[0]
    _check_k(n_neighbors, n)
    s = _series(a)
    idx, dist = _internal.knn_search(s, s, n_neighbors + 1)
    idx = idx.to_numpy().astype(np.int64)
    dist = dist.to_numpy()
    # Drop the cell itself; when duplicates pushed it out of the k+1, drop the last.
    is_self = idx == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), n_neighbors)
    keep = np.ones(idx.shape, dtype=bool)
    keep[np.arange(n), drop] = False
    return idx[keep].reshape(n, n_neighbors), dist[keep].reshape(n, n_neighbors)


# ------------------------------------------------------- graph → numbers


def batch_entropy(indices: np.ndarray, batch: object) -> tuple[float, float]:
    """Mean natural-log entropy of the batches among each cell's neighbours.

    Parameters
    ----------
    indices : numpy.ndarray
        ``(n_cells, k)`` integer neighbour table, row i the cells nearest to
        cell i (:func:`neighbors`' first output).
    batch : sequence
        ``(n_cells,)`` batch labels (a list, a NumPy array or a Polars Series
        of any dtype; no nulls).

    Returns
    -------
    entropy : float
        The mean over cells of the entropy of their neighbours' batches (the
        reference method's ``mix``).
    entropy_norm : float
        ``entropy / ln B`` for B batches (1: perfect mixing); 0 with one batch.

    Examples
    --------
    >>> import numpy as np, polars_singlecell as psc
    >>> psc.metrics.batch_entropy(np.array([[1], [0]]), ["a", "b"])
    (0.0, 0.0)
    """
    codes, n_b = _codes(batch, "batch")
    counts = np.zeros((indices.shape[0], n_b))
    np.add.at(counts, (np.repeat(np.arange(indices.shape[0]), indices.shape[1]), codes[indices].ravel()), 1.0)
    p = counts / indices.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    mean = float(h.mean())
    return mean, (float(mean / np.log(n_b)) if n_b > 1 else 0.0)


def lisi(indices: np.ndarray, distances: np.ndarray, labels: object, perplexity: float = 30) -> np.ndarray:
    """Per-cell LISI (harmonypy's ``compute_lisi``) from a neighbour table.

    Parameters
    ----------
    indices : numpy.ndarray
        ``(n_cells, k)`` integer neighbour table with ``k`` ≥ ``3 · perplexity``
        nearest others (:func:`neighbors`).
    distances : numpy.ndarray
        ``(n_cells, k)`` Euclidean distances of those neighbours.
    labels : sequence
        ``(n_cells,)`` labels (a list, a NumPy array or a Polars Series of
        any dtype; no nulls).
    perplexity : float, default 30
        The perplexity the Gaussian weights are calibrated to.

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` float64: each cell's LISI, from 1 to the number of labels.

    Raises
    ------
    ValueError
        The table has fewer than ``3 · perplexity`` neighbours.
    """
    codes, n_c = _codes(labels, "labels")
    k = indices.shape[1]
    if k < 3 * perplexity:
        raise ValueError(f"LISI with perplexity {perplexity} reads {int(3 * perplexity)} neighbours, the table has {k}: pass neighbors(x, {int(3 * perplexity)})")
    out = _internal.lisi(
        pl.Series(np.ascontiguousarray(distances, dtype=np.float32), dtype=pl.Array(pl.Float32, k)),
        pl.Series(codes[indices].ravel().astype(np.uint32)),
        n_c,
        float(perplexity),
    )
    return out.to_numpy()


def ilisi(lisi_values: np.ndarray, n_batches: int) -> float:
    """scib-metrics' scaled iLISI: (median − 1) / (B − 1); 1 = fully mixed.

    Parameters
    ----------
    lisi_values : numpy.ndarray
        ``(n_cells,)`` per-cell LISI of the batches (:func:`lisi`).
    n_batches : int
        B, the number of batches.

    Returns
    -------
    float
        The scaled iLISI; NaN with one batch.
    """
    return float((np.nanmedian(lisi_values) - 1) / (n_batches - 1)) if n_batches > 1 else float("nan")


def clisi(lisi_values: np.ndarray, n_labels: int) -> float:
    """scib-metrics' scaled cLISI: (C − median) / (C − 1); 1 = labels kept apart.

    Parameters
    ----------
    lisi_values : numpy.ndarray
        ``(n_cells,)`` per-cell LISI of the labels (:func:`lisi`).
    n_labels : int
        C, the number of labels.

    Returns
    -------
    float
        The scaled cLISI; NaN with one label.
    """
    return float((n_labels - np.nanmedian(lisi_values)) / (n_labels - 1)) if n_labels > 1 else float("nan")


def label_purity(indices: np.ndarray, labels: object) -> float:
    """Mean fraction of each cell's neighbours that share its label.

    Parameters
    ----------
    indices : numpy.ndarray
        ``(n_cells, k)`` integer neighbour table, row i the cells nearest to
        cell i (:func:`neighbors`' first output).
    labels : sequence
        ``(n_cells,)`` labels (a list, a NumPy array or a Polars Series of
        any dtype; no nulls).

    Returns
    -------
    float
        In [0, 1]; 1: every neighbour has the cell's label.
    """
    codes, _ = _codes(labels, "labels")
    return float((codes[indices] == codes[:, None]).mean())


def _majority(neighbour_codes: np.ndarray, n_c: int) -> np.ndarray:
    """Most frequent code per row; ties to the smallest code (scikit-learn)."""
    counts = np.zeros((neighbour_codes.shape[0], n_c), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(neighbour_codes.shape[0]), neighbour_codes.shape[1]), neighbour_codes.ravel()), 1)
    return counts.argmax(axis=1)


def label_transfer(x: object, batch: object, labels: object, n_neighbors: int = 30) -> float:
    """Leave-one-batch-out kNN classification accuracy over all cells.

    Each batch's cells are classified by the majority label of their
    ``n_neighbors`` nearest cells in the other batches (ties to the first
    label in sorted order); a cell whose label no other batch has counts as
    misclassified.

    Parameters
    ----------
    x : numpy.ndarray or polars.Series
        The embedding, ``(n_cells, d)`` (any float dtype, read as float32) or
        an ``Array(Float32, d)`` Series; finite.
    batch : sequence
        ``(n_cells,)`` batch labels (a list, a NumPy array or a Polars Series
        of any dtype; no nulls).
    labels : sequence
        ``(n_cells,)`` labels (a list, a NumPy array or a Polars Series of
        any dtype; no nulls).
    n_neighbors : int, default 30
        Neighbours that vote.

    Returns
    -------
    float
        The fraction of cells classified correctly, in [0, 1].

    Raises
    ------
    ValueError
        One batch only, or fewer cells outside a batch than ``n_neighbors``.
    """
    a = _matrix(x)
    b, n_b = _codes(batch, "batch")
    lab, n_c = _codes(labels, "labels")
    if n_b < 2:
        raise ValueError("label_transfer needs at least 2 batches, got 1")
    correct = 0
    for g in range(n_b):
        held, rest = np.flatnonzero(b == g), np.flatnonzero(b != g)
        _check_k(n_neighbors, rest.size + 1, "n_neighbors (cells outside one batch)")
        idx, _ = _internal.knn_search(_series(a[held]), _series(a[rest]), n_neighbors)
        pred = _majority(lab[rest][idx.to_numpy().astype(np.int64)], n_c)
        correct += int((pred == lab[held]).sum())
    return correct / a.shape[0]


def graph_connectivity(indices: np.ndarray, labels: object) -> float:
    """scib's graph connectivity on the (symmetrised) graph of ``indices``.

    Per label, the fraction of its cells in the largest connected component
    of the graph restricted to that label; the mean over labels.

    Parameters
    ----------
    indices : numpy.ndarray
        ``(n_cells, k)`` integer neighbour table, row i the cells nearest to
        cell i (:func:`neighbors`' first output).
    labels : sequence
        ``(n_cells,)`` labels (a list, a NumPy array or a Polars Series of
        any dtype; no nulls).

    Returns
    -------
    float
        In (0, 1]; 1: each label's cells are connected.
    """
    codes, n_c = _codes(labels, "labels")
    n, k = indices.shape
    src = np.repeat(np.arange(n), k)
    dst = indices.ravel()
    same = codes[src] == codes[dst]  # edges inside one label: components never cross labels
    comp = _internal.connected_components(
        n, pl.Series(src[same].astype(np.uint32)), pl.Series(dst[same].astype(np.uint32))
    ).to_numpy()
    scores = []
    for c in range(n_c):
        members = comp[codes == c]
        if members.size:
            scores.append(np.bincount(members).max() / members.size)
    return float(np.mean(scores))


# ------------------------------------------------- silhouettes, clusters

#: scIB's bio-conservation metrics among ours (see the module docstring).
BIO_CONSERVATION = ("isolated_labels", "nmi", "ari", "silhouette_label", "clisi")
#: scIB's batch-correction metrics among ours (see the module docstring).
BATCH_CORRECTION = ("silhouette_batch", "ilisi", "graph_connectivity")

_BLOCK_BYTES = 1 << 25  # float64 distances held at once by _silhouette_samples: 32 MiB


def _same_length(n: int, values: object, name: str) -> None:
    m = len(values)
    if m != n:
        raise ValueError(f"{name} has {m} values but the embedding has {n} cells: pass one value per cell")


def _silhouette_samples(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """scikit-learn's ``silhouette_samples`` (Euclidean) of the rows of ``x``
    grouped by ``codes``; 0 where it is 0/0 (a cluster of one cell, or equal
    mean distances), as scikit-learn's and scib-metrics' ``nan_to_num``.

    Distances in float64 on centred rows, ‖a‖² + ‖b‖² − 2a·b clamped at 0
    (a cell's distance to itself set to exactly 0), in row blocks of at most
    32 MiB; per block the distances to each cluster are summed in a fixed
    order (the same bits at any BLAS thread count).
    """
    _, codes = np.unique(codes, return_inverse=True)  # clusters 0..C-1, all non-empty
    codes = codes.ravel()
    a = x.astype(np.float64)
    a -= a.mean(axis=0)
    n, n_c = a.shape[0], int(codes.max()) + 1
    sq = np.einsum("ij,ij->i", a, a)
    # Columns grouped by cluster: each cluster's distances are summed by
    # np.add.reduceat, in a fixed order. A GEMM with an indicator matrix
    # would reduce over n, which OpenBLAS splits by thread count: the last
    # bits then depend on it (seen: OPENBLAS_NUM_THREADS 1 vs 2).
    perm = np.argsort(codes, kind="stable")
    freqs = np.bincount(codes, minlength=n_c).astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(freqs[:-1])]).astype(np.intp)
    intra, inter = np.empty(n), np.empty(n)
    step = max(1, min(n, _BLOCK_BYTES // (8 * n)))
    for s in range(0, n, step):
        e = min(s + step, n)
        r = np.arange(e - s)
        d = a[s:e] @ a.T
        d *= -2.0
        d += sq[s:e, None]
        d += sq[None, :]
        np.maximum(d, 0.0, out=d)
        d[r, r + s] = 0.0
        np.sqrt(d, out=d)
        sums = np.add.reduceat(d[:, perm], starts, axis=1)  # (block, C): summed distance to each cluster
        own = codes[s:e]
        intra[s:e] = sums[r, own]
        sums /= freqs
        sums[r, own] = np.inf
        inter[s:e] = sums.min(axis=1) if n_c > 1 else np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        intra /= freqs[codes] - 1
        sil = (inter - intra) / np.maximum(intra, inter)
    return np.nan_to_num(sil, nan=0.0, posinf=0.0, neginf=0.0)


def _labelled(x: object, labels: object, what: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(embedding, label codes, label names) checked for a silhouette of labels."""
    a = _matrix(x)
    _same_length(a.shape[0], labels, "labels")
    codes, n_c, cats = _categories(labels, "labels")
    if n_c < 2:
        raise ValueError(f"{what} needs at least 2 labels to tell apart, got 1 ({cats[0]!r})")
    return a, codes, cats


def silhouette_label(x: object, labels: object) -> float:
    """scib-metrics' label silhouette (ASW), rescaled to [0, 1]:
    (mean over cells of the Euclidean silhouette of ``labels`` + 1) / 2.

    O(n²) time over the cells given (memory in 32 MiB blocks).

    Parameters
    ----------
    x : numpy.ndarray or polars.Series
        The embedding, ``(n_cells, d)`` (any float dtype, read as float32) or
        an ``Array(Float32, d)`` Series; finite.
    labels : sequence
        ``(n_cells,)`` labels (a list, a NumPy array or a Polars Series of
        any dtype; no nulls).

    Returns
    -------
    float
        In [0, 1]; 1: labels far apart and compact.

    Raises
    ------
    ValueError
        Fewer than 2 labels, or ``labels`` of another length than ``x``.

    Examples
    --------
    >>> import numpy as np, polars_singlecell as psc
    >>> x = np.array([[0.0], [1.0], [10.0], [11.0]])
    >>> round(psc.metrics.silhouette_label(x, ["a", "a", "b", "b"]), 4)
    0.9499
    """
    a, codes, _ = _labelled(x, labels, "silhouette_label")
    return float((_silhouette_samples(a, codes).mean() + 1) / 2)


def _silhouette_batch_per_label(a: np.ndarray, codes: np.ndarray, n_c: int, batch_codes: np.ndarray) -> list[float]:
    scores = []
    for c in range(n_c):
        rows = np.flatnonzero(codes == c)
        n_b = np.unique(batch_codes[rows]).size
        if n_b == 1 or n_b == rows.size:  # scib-metrics skips these labels
            continue
        scores.append(float(np.mean(1.0 - np.abs(_silhouette_samples(a[rows], batch_codes[rows])))))
    return scores


def silhouette_batch(x: object, labels: object, batch: object) -> float:
    """scib-metrics' batch silhouette: per label, the mean of 1 − |s| over its
    cells, s the silhouette of ``batch`` among the label's cells; the mean
    over labels. Labels in one batch, or with every cell in its own batch,
    are skipped; 1 = batches mixed within each label.

    Parameters
    ----------
    x : numpy.ndarray or polars.Series
        The embedding, ``(n_cells, d)`` (any float dtype, read as float32) or
        an ``Array(Float32, d)`` Series; finite.
    labels : sequence
        ``(n_cells,)`` labels (a list, a NumPy array or a Polars Series of
        any dtype; no nulls).
    batch : sequence
        ``(n_cells,)`` batch labels (a list, a NumPy array or a Polars Series
        of any dtype; no nulls).

    Returns
    -------
    float
        In [0, 1].

    Raises
    ------
    ValueError
        No label has cells from 2 or more batches (and not each from its own
        batch), or ``labels``/``batch`` of another length than ``x``.

    Examples
    --------
    >>> import numpy as np, polars_singlecell as psc
    >>> x = np.array([[0.0], [1.0], [10.0], [11.0], [0.5], [10.5]])
    >>> psc.metrics.silhouette_batch(x, ["a", "a", "b", "b", "a", "b"], ["p", "q", "p", "q", "p", "q"])
    0.8333333333333334
    """
    a = _matrix(x)
    _same_length(a.shape[0], labels, "labels")
    _same_length(a.shape[0], batch, "batch")
    codes, n_c = _codes(labels, "labels")
    b, _ = _codes(batch, "batch")
    scores = _silhouette_batch_per_label(a, codes, n_c, b)
    if not scores:
        raise ValueError(
            "silhouette_batch needs a label whose cells come from 2 or more batches (and not each from its own); "
            "no label has that"
        )
    return float(np.mean(scores))


def _isolated(codes: np.ndarray, n_c: int, batch_codes: np.ndarray, n_b: int) -> np.ndarray:
    """Codes of the labels present in the fewest batches."""
    pairs = np.unique(codes.astype(np.int64) * n_b + batch_codes)
    per_label = np.bincount(pairs // n_b, minlength=n_c)
    present = per_label > 0
    return np.flatnonzero(present & (per_label == per_label[present].min()))


def _isolated_score(sil: np.ndarray, codes: np.ndarray, iso: np.ndarray) -> float:
    rescaled = (sil + 1) / 2
    return float(np.mean([rescaled[codes == c].mean() for c in iso]))


def isolated_labels(x: object, labels: object, batch: object) -> float:
    """scib-metrics' isolated-label score (silhouette variant, rescaled): for
    each label present in the fewest batches, the mean of (s + 1)/2 over its
    cells, s the label silhouette against all labels; the mean over those labels.

    Parameters
    ----------
    x : numpy.ndarray or polars.Series
        The embedding, ``(n_cells, d)`` (any float dtype, read as float32) or
        an ``Array(Float32, d)`` Series; finite.
    labels : sequence
        ``(n_cells,)`` labels (a list, a NumPy array or a Polars Series of
        any dtype; no nulls).
    batch : sequence
        ``(n_cells,)`` batch labels (a list, a NumPy array or a Polars Series
        of any dtype; no nulls).

    Returns
    -------
    float
        In [0, 1].

    Raises
    ------
    ValueError
        Fewer than 2 labels, or ``labels``/``batch`` of another length than ``x``.

    Examples
    --------
    >>> import numpy as np, polars_singlecell as psc
    >>> x = np.array([[0.0], [1.0], [10.0], [11.0], [0.5], [10.5]])
    >>> # "b" is only in batch "q": its cells' mean rescaled silhouette
    >>> round(psc.metrics.isolated_labels(x, list("aabbab"), list("pqqqpq")), 4)
    0.9666
    """
    a, codes, cats = _labelled(x, labels, "isolated_labels")
    _same_length(a.shape[0], batch, "batch")
    b, n_b = _codes(batch, "batch")
    return _isolated_score(_silhouette_samples(a, codes), codes, _isolated(codes, len(cats), b, n_b))


def _contingency(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    _, t = np.unique(true, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    t, p = t.ravel(), p.ravel()
    n_p = int(p.max()) + 1 if p.size else 0
    n_t = int(t.max()) + 1 if t.size else 0
    return np.bincount(t.astype(np.int64) * n_p + p, minlength=n_t * n_p).reshape(n_t, n_p)


def _nmi(true: np.ndarray, pred: np.ndarray) -> float:
    """scikit-learn's ``normalized_mutual_info_score(average_method="arithmetic")``."""
    cont = _contingency(true, pred)
    if cont.shape[0] == cont.shape[1] <= 1:
        return 1.0  # neither labelling splits the cells: a perfect match
    if min(cont.shape) == 1:
        return 0.0
    n = float(cont.sum())
    pi, pj = cont.sum(axis=1), cont.sum(axis=0)
    nzx, nzy = np.nonzero(cont)
    v = cont[nzx, nzy].astype(np.float64)
    p = v / n
    log_outer = -np.log((pi[nzx] * pj[nzy]).astype(np.float64)) + 2 * np.log(n)
    mi = p * (np.log(v) - np.log(n)) + p * log_outer
    mi = float(np.clip(np.where(np.abs(mi) < np.finfo(np.float64).eps, 0.0, mi).sum(), 0.0, None))
    if mi == 0:
        return 0.0

    def entropy(counts: np.ndarray) -> float:
        c = counts[counts > 0].astype(np.float64)
        return float(-np.sum((c / n) * (np.log(c) - np.log(n))))

    return float(mi / np.mean([entropy(pi), entropy(pj)]))


def _ari(true: np.ndarray, pred: np.ndarray) -> float:
    """scikit-learn's ``adjusted_rand_score`` (pair counts as Python integers)."""
    cont = _contingency(true, pred)
    n = int(cont.sum())
    sum_sq = int((cont.astype(np.int64) ** 2).sum())
    tp = sum_sq - n
    fp = int(cont.dot(cont.sum(axis=0)).sum()) - sum_sq
    fn = int(cont.T.dot(cont.sum(axis=1)).sum()) - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _kmeans_labels(a: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster of each row: nearest centre of our k-means (``kmeans_centroids``)."""
    from polars_singlecell.centroids import kmeans_centroids

    s = _series(a)
    fit = pl.DataFrame({"x": s}).select(kmeans_centroids("x", n_centroids=k, random_state=seed))
    centres = fit["centroids"].struct.field("centroid")[0]
    idx, _ = _internal.knn_search(s, centres, 1)
    return idx.to_numpy().astype(np.int64).ravel()


@renamed(seed="random_state")
def nmi_ari_cluster_labels_kmeans(x: object, labels: object, random_state: int = 0) -> dict[str, float]:
    """scib-metrics' ``nmi_ari_cluster_labels_kmeans``: k-means of ``x`` with
    k = the number of labels; ``{"nmi": NMI, "ari": ARI}`` of the clusters
    against the labels (scikit-learn's definitions, arithmetic NMI).

    The k-means is our :func:`polars_singlecell.kmeans_centroids` (greedy
    k-means++ seeding from ``random_state``, Lloyd passes to tolerance 1e-4 × the mean
    per-feature variance, at most 300, one initialisation), each cell then
    assigned to its nearest centre: scikit-learn is not a runtime dependency,
    and this is the algorithm of scikit-learn's ``KMeans(n_init=1)`` and of
    scib-metrics' own JAX ``KMeans`` (k-means++ with 2 + ln k local trials,
    n_init=1, random_state 0, same tolerance), deterministic at any thread count.
    Above max(3k, 10 000) cells its seeding runs on a random subset with a
    short warm-up (see ``kmeans_centroids``). k-means++ seeds differ between
    the three implementations, so the clusters (and scores) agree exactly only
    where the clustering is unambiguous.

    Parameters
    ----------
    x : numpy.ndarray or polars.Series
        The embedding, ``(n_cells, d)`` (any float dtype, read as float32) or
        an ``Array(Float32, d)`` Series; finite.
    labels : sequence
        ``(n_cells,)`` labels (a list, a NumPy array or a Polars Series of
        any dtype; no nulls).
    random_state : int, default 0
        Seed of the k-means++ seeding, in [0, 2**64).

    Returns
    -------
    dict of str to float
        ``{"nmi": NMI, "ari": ARI}``.

    Raises
    ------
    ValueError
        Fewer than 2 labels, or ``labels`` of another length than ``x``.

    Examples
    --------
    >>> import numpy as np, polars_singlecell as psc
    >>> x = np.concatenate([np.zeros((5, 2)), np.full((5, 2), 9.0)]) + np.arange(10)[:, None] * 0.01
    >>> psc.metrics.nmi_ari_cluster_labels_kmeans(x, ["a"] * 5 + ["b"] * 5)
    {'nmi': 1.0, 'ari': 1.0}
    """
    a, codes, cats = _labelled(x, labels, "nmi_ari_cluster_labels_kmeans")
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)) or not 0 <= random_state < 2**64:
        raise ValueError(f"random_state must be an integer in [0, 2**64), got {random_state!r}")
    pred = _kmeans_labels(a, len(cats), int(random_state))
    return {"nmi": _nmi(codes, pred), "ari": _ari(codes, pred)}


def aggregate(values: Mapping[str, float]) -> dict[str, float]:
    """scIB's aggregate scores from metric values by name: ``bio_conservation``
    (mean of the :data:`BIO_CONSERVATION` metrics present), ``batch_correction``
    (mean of the :data:`BATCH_CORRECTION` ones) and ``overall`` = 0.6 × bio +
    0.4 × batch. Missing or NaN metrics are left out of their group's mean; a
    group with none is NaN, and so is ``overall``. Other names are ignored.

    Parameters
    ----------
    values : mapping of str to float
        Metric values by name (e.g. ``{"nmi": 0.8, "ilisi": 0.5}``).

    Returns
    -------
    dict of str to float
        ``bio_conservation``, ``batch_correction`` and ``overall``.

    Examples
    --------
    >>> import polars_singlecell as psc
    >>> psc.metrics.aggregate({"nmi": 0.8, "ari": 0.6, "ilisi": 0.5, "label_purity": 0.1})
    {'bio_conservation': 0.7, 'batch_correction': 0.5, 'overall': 0.62}
    """

    def mean(names: Sequence[str]) -> float:
        got = [float(values[k]) for k in names if k in values and not np.isnan(values[k])]
        return float(np.mean(got)) if got else float("nan")

    bio, batch = mean(BIO_CONSERVATION), mean(BATCH_CORRECTION)
    return {"bio_conservation": bio, "batch_correction": batch, "overall": 0.6 * bio + 0.4 * batch}


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


@renamed(seed="random_state")
def overlap0(start: object, result: object, n_neighbors: int = 30, n_cells: int = 5000, random_state: int = 0) -> float:
    """Mean fraction of shared ``n_neighbors``-NN between two embeddings of the same cells.

    On ``n_cells`` seeded sampled cells, neighbours searched among them.

    Parameters
    ----------
    start, result : numpy.ndarray or polars.Series
        Two embeddings of the same cells, ``(n_cells, d_start)`` and
        ``(n_cells, d_result)`` (or ``Array`` Series), in the same row order.
    n_neighbors : int, default 30
        Neighbours compared per cell.
    n_cells : int, default 5000
        Cells sampled (all of them when fewer).
    random_state : int, default 0
        The sample's seed.

    Returns
    -------
    float
        In [0, 1]; 1: every cell keeps its neighbours.
    """
    a, b = _pair(start, result)
    rows = _sample(a.shape[0], n_cells, random_state)
    ia, _ = neighbors(a[rows], n_neighbors)
    ib, _ = neighbors(b[rows], n_neighbors)
    shared = (ia[:, :, None] == ib[:, None, :]).any(axis=2).sum(axis=1)
    return float((shared / n_neighbors).mean())


def strain(start: object, result: object, n_neighbors: int = 20) -> float:
    """Mean over the start's ``n_neighbors``-NN edges of clip(d_new/d_0 − 1, −1, 1)².

    Edges of length 0 in ``start`` are skipped (their ratio is undefined).

    Parameters
    ----------
    start, result : numpy.ndarray or polars.Series
        Two embeddings of the same cells, ``(n_cells, d_start)`` and
        ``(n_cells, d_result)`` (or ``Array`` Series), in the same row order.
    n_neighbors : int, default 20
        Neighbours per cell in ``start`` whose edges are measured.

    Returns
    -------
    float
        In [0, 1]; 0: no edge stretched or shrunk.
    """
    a, b = _pair(start, result)
    idx, _ = neighbors(a, n_neighbors)

    def lengths(e: np.ndarray) -> np.ndarray:  # float64, the same way for both; 4096 cells at a time
        out = np.empty(idx.shape)
        for s in range(0, len(e), 4096):
            block = e[s : s + 4096, None, :].astype(np.float64) - e[idx[s : s + 4096]].astype(np.float64)
            out[s : s + 4096] = np.sqrt((block * block).sum(axis=2))
        return out

    d0, d1 = lengths(a), lengths(b)
    ok = d0 > 0
    r = np.clip(d1[ok] / d0[ok] - 1.0, -1.0, 1.0)
    return float((r * r).mean())


@renamed(seed="random_state")
def trustworthiness(start: object, result: object, n_neighbors: int = 30, n_cells: int = 2500, random_state: int = 0) -> float:
    """scikit-learn's ``trustworthiness(start, result, n_neighbors)`` on sampled cells.

    Parameters
    ----------
    start, result : numpy.ndarray or polars.Series
        Two embeddings of the same cells, ``(n_cells, d_start)`` and
        ``(n_cells, d_result)`` (or ``Array`` Series), in the same row order.
    n_neighbors : int, default 30
        k, below half the sampled cells (scikit-learn's bound).
    n_cells : int, default 2500
        Cells sampled, seeded (all of them when fewer).
    random_state : int, default 0
        The sample's seed.

    Returns
    -------
    float
        At most 1; 1: ``result``'s neighbourhoods hold no cells that are far
        in ``start``.

    Raises
    ------
    ValueError
        ``n_neighbors`` not below half the sampled cells.
    """
    a, b = _pair(start, result)
    rows = _sample(a.shape[0], n_cells, random_state)
    a, b = a[rows].astype(np.float64), b[rows]
    m = a.shape[0]
    _check_k(n_neighbors, m)
    if n_neighbors >= m / 2:
        raise ValueError(f"n_neighbors={n_neighbors} must be below half the {m} sampled cells (scikit-learn's bound)")
    sq = (a * a).sum(axis=1)
    dist = sq[:, None] + sq[None, :] - 2 * a @ a.T
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")
    rank = np.empty_like(order)
    rank[np.arange(m)[:, None], order] = np.arange(1, m + 1)[None, :]
    emb, _ = neighbors(b, n_neighbors)
    r = rank[np.arange(m)[:, None], emb] - n_neighbors
    t = r[r > 0].sum()
    return float(1.0 - t * (2.0 / (m * n_neighbors * (2.0 * m - 3.0 * n_neighbors - 1.0))))


def _pair(start: object, result: object) -> tuple[np.ndarray, np.ndarray]:
    a, b = _matrix(start, "start"), _matrix(result, "result")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"start has {a.shape[0]} cells but result has {b.shape[0]}: pass two embeddings of the same cells")
    return a, b


# -------------------------------------------------------------- one call


@renamed(seed="random_state")
def evaluate(
    cells: pl.DataFrame | pl.LazyFrame,
    embeddings: Sequence[str] = ("X_pca", "X_ot"),
    *,
    batch_key: str = "batch",
    label_key: str | None = None,
    n_neighbors: int = 30,
    perplexity: float = 30,
    max_cells: int = 100_000,
    silhouette_cells: int = 10_000,
    random_state: int = 0,
) -> pl.DataFrame:
    """All metrics for several embeddings of the same cells, as a tidy frame.

    Label metrics (``clisi``, ``label_purity``, ``label_transfer``,
    ``graph_connectivity``, ``silhouette_label``, ``silhouette_batch``,
    ``isolated_labels``, ``nmi``, ``ari``) and the scIB aggregate rows
    (``bio_conservation``, ``batch_correction``, ``overall``; see
    :func:`aggregate`) need ``label_key``. The first embedding is the start
    the others are compared with (``overlap0``, ``strain``, ``tw``).
    At most ``max_cells`` cells are used: a seeded sample, the same for every
    embedding. The three silhouette metrics, O(n²), use a seeded sub-sample
    of at most ``silhouette_cells`` of those (the same for every embedding;
    all of them when fewer), as if scib-metrics were run on it: the isolated
    labels are then those in the fewest batches among these cells. NMI and
    ARI cluster all the sampled cells (k-means is O(n·k) per pass).
    With one label, the label-separation metrics (``clisi``, the silhouettes,
    ``isolated_labels``, ``nmi``, ``ari``) are NaN, as is ``silhouette_batch``
    when no label spans 2 batches; NaN metrics are left out of the aggregates.

    Parameters
    ----------
    cells : polars.DataFrame or polars.LazyFrame
        One row per cell with ``batch_key``, ``label_key`` and the embeddings.
    embeddings : sequence of str or str, default ("X_pca", "X_ot")
        ``Array(Float32, d)`` columns (Float64 arrays are cast), the first
        the start the others are compared with.
    batch_key : str, default "batch"
        The batch column.
    label_key : str or None, default None
        The label (cell type) column; ``None``: batch metrics only.
    n_neighbors : int, default 30
        Neighbours of the kNN metrics.
    perplexity : float, default 30
        LISI's perplexity (≥ 1; it reads ``3 · perplexity`` neighbours).
    max_cells : int, default 100_000
        Cells in the seeded sample (≥ 2).
    silhouette_cells : int, default 10_000
        Cells in the silhouettes' sub-sample (≥ 2).
    random_state : int, default 0
        Seed of the samples and of the k-means.

    Returns
    -------
    polars.DataFrame
        Columns ``embedding`` (String), ``metric`` (String) and ``value``
        (Float64), one row per embedding and metric, starting with
        ``n_cells``, ``batch_entropy``, ``batch_entropy_norm`` and ``ilisi``.

    Raises
    ------
    polars.exceptions.ColumnNotFoundError
        A named column is missing.
    ValueError
        No embeddings, or a count out of range.
    """
    if isinstance(embeddings, str):
        embeddings = [embeddings]
    if not embeddings:
        raise ValueError("embeddings is empty: name at least one Array(Float32, d) column")
    if not isinstance(max_cells, (int, np.integer)) or max_cells < 2:
        raise ValueError(f"max_cells must be an integer ≥ 2, got {max_cells!r}")
    if isinstance(silhouette_cells, bool) or not isinstance(silhouette_cells, (int, np.integer)) or silhouette_cells < 2:
        raise ValueError(f"silhouette_cells must be an integer ≥ 2, got {silhouette_cells!r}")
    _positive_k(n_neighbors)  # the count is checked once the cells are read
    lf = cells.lazy()
    names = lf.collect_schema().names()
    wanted = [batch_key, *([label_key] if label_key else []), *embeddings]
    for c in wanted:
        if c not in names:
            raise pl.exceptions.ColumnNotFoundError(f"column '{c}' is not in the cells (columns: {names})")
    from polars_singlecell._files import seeded_sample

    df = seeded_sample(lf.select(wanted), max_cells, random_state).collect(engine="streaming")
    batch = df[batch_key]
    _, n_b = _codes(batch, batch_key)
    labels = df[label_key] if label_key else None
    n_c = _codes(labels, label_key)[1] if label_key else 0
    if labels is not None:  # the silhouettes' sub-sample, with its own codes
        sil_rows = _sample(df.height, silhouette_cells, random_state)
        sil_lab, sil_n_c = _codes(labels.gather(sil_rows), label_key)
        sil_b, sil_n_b = _codes(batch.gather(sil_rows), batch_key)
    if not (isinstance(perplexity, (int, float)) and perplexity >= 1):
        raise ValueError(f"perplexity must be a number ≥ 1, got {perplexity!r}")
    k_lisi = int(3 * perplexity)
    k_all = max(n_neighbors, k_lisi, 14)
    rows = []
    start = None
    for name in embeddings:
        x = _matrix(df[name])
        start = x if start is None else start
        _check_k(k_all, x.shape[0])
        idx, dist = neighbors(x, k_all)
        knn = idx[:, :n_neighbors]
        ent, ent_norm = batch_entropy(knn, batch)
        out = {
            "n_cells": float(x.shape[0]),
            "batch_entropy": ent,
            "batch_entropy_norm": ent_norm,
            "ilisi": ilisi(lisi(idx[:, :k_lisi], dist[:, :k_lisi], batch, perplexity), n_b),
        }
        if labels is not None:
            out["clisi"] = clisi(lisi(idx[:, :k_lisi], dist[:, :k_lisi], labels, perplexity), n_c)
            out["label_purity"] = label_purity(knn, labels)
            out["label_transfer"] = label_transfer(x, batch, labels, n_neighbors) if n_b > 1 else float("nan")
            out["graph_connectivity"] = graph_connectivity(idx[:, :14], labels)
            nan = float("nan")
            xs = x[sil_rows]
            sil = _silhouette_samples(xs, sil_lab) if sil_n_c > 1 else None
            out["silhouette_label"] = float((sil.mean() + 1) / 2) if sil is not None else nan
            per_label = _silhouette_batch_per_label(xs, sil_lab, sil_n_c, sil_b)
            out["silhouette_batch"] = float(np.mean(per_label)) if per_label else nan
            iso = _isolated(sil_lab, sil_n_c, sil_b, sil_n_b)
            out["isolated_labels"] = _isolated_score(sil, sil_lab, iso) if sil is not None else nan
            if n_c > 1:
                out.update(nmi_ari_cluster_labels_kmeans(x, labels, random_state))
            else:
                out["nmi"] = out["ari"] = nan
        if x is not start:
            out["overlap0"] = overlap0(start, x, 30, 5000, random_state)
            out["strain"] = strain(start, x, 20)
            out["tw"] = trustworthiness(start, x, 30, 2500, random_state)
        if labels is not None:
            out.update(aggregate(out))
        rows += [(name, k, float(v)) for k, v in out.items()]
    return pl.DataFrame(rows, schema={"embedding": pl.String, "metric": pl.String, "value": pl.Float64}, orient="row")
