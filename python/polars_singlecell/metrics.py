"""Cell-level integration metrics: did the batches mix, and did biology survive?

Everything here runs on one exact kNN graph per embedding (our kNN kernel,
Euclidean, self excluded), built on a seeded sample of at most ``max_cells``
cells: a cell's neighbours are searched among the sampled cells, as when scIB
metrics are run on a subsample. The sample is drawn in Polars' streaming
engine (the ``max_cells`` cells with the smallest seeded hash of their row
number), so a LazyFrame over a Parquet lake is never held whole.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from polars_singlecell import _internal

__all__ = [
    "neighbors",
    "batch_entropy",
    "lisi",
    "ilisi",
    "clisi",
    "label_purity",
    "label_transfer",
    "graph_connectivity",
    "overlap0",
    "strain",
    "trustworthiness",
    "evaluate",
]


# ------------------------------------------------------------------ inputs


def _matrix(x: object, name: str = "embedding") -> np.ndarray:
    """A finite (n, d) float32 matrix from a NumPy array or an Array Series."""
    if isinstance(x, pl.Series):
        if not isinstance(x.dtype, pl.Array):
            raise TypeError(f"column '{x.name}' has dtype {x.dtype}, expected Array(Float32, d)")
        if x.null_count():
            raise ValueError(f"column '{x.name}' is null at row {x.is_null().arg_true()[0]}; drop null cells first")
        name = x.name
        x = x.cast(pl.Array(pl.Float32, x.dtype.size)).to_numpy()
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D (cells × dims) matrix, got shape {a.shape}")
    bad = ~np.isfinite(a)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{name} holds {a[row][bad[row]][0]} at row {row}; embeddings must be finite")
    return a


def _codes(values: object, name: str) -> tuple[np.ndarray, int]:
    """Category codes 0..C-1 and C (see :func:`_categories`)."""
    codes, n, _ = _categories(values, name)
    return codes, n


def _categories(values: object, name: str) -> tuple[np.ndarray, int, list[str]]:
    """Category codes 0..C-1, C, and the categories as text, in sorted order."""
    s = pl.Series(name, values) if not isinstance(values, pl.Series) else values
    if s.null_count():
        raise ValueError(f"column '{name}' is null at row {s.is_null().arg_true()[0]}; fill or drop those cells")
    if not s.dtype.is_numeric():  # numbers sort as numbers (scikit-learn's class order), the rest as text
        s = s.cast(pl.String)
    cats = s.unique().sort()
    codes = s.replace_strict(cats, pl.int_range(cats.len(), eager=True), return_dtype=pl.UInt32)
    return codes.to_numpy(), cats.len(), cats.cast(pl.String).to_list()


def _series(a: np.ndarray) -> pl.Series:
    return pl.Series(a, dtype=pl.Array(pl.Float32, a.shape[1]))


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

    Returns (indices (n, k) int64, distances (n, k) float32), ascending,
    Euclidean, self excluded (a duplicate of the cell may be among them).

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
    """(mean natural-log entropy of the neighbours' batches, that / ln B).

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
    """Per-cell LISI (harmonypy's ``compute_lisi``) from a neighbour table of
    ``3 · perplexity`` nearest others (see :func:`neighbors`)."""
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
    """scib-metrics' scaled iLISI: (median − 1) / (B − 1); 1 = fully mixed."""
    return float((np.nanmedian(lisi_values) - 1) / (n_batches - 1)) if n_batches > 1 else float("nan")


def clisi(lisi_values: np.ndarray, n_labels: int) -> float:
    """scib-metrics' scaled cLISI: (C − median) / (C − 1); 1 = labels kept apart."""
    return float((n_labels - np.nanmedian(lisi_values)) / (n_labels - 1)) if n_labels > 1 else float("nan")


def label_purity(indices: np.ndarray, labels: object) -> float:
    """Mean fraction of each cell's neighbours that share its label."""
    codes, _ = _codes(labels, "labels")
    return float((codes[indices] == codes[:, None]).mean())


def _majority(neighbour_codes: np.ndarray, n_c: int) -> np.ndarray:
    """Most frequent code per row; ties to the smallest code (scikit-learn)."""
    counts = np.zeros((neighbour_codes.shape[0], n_c), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(neighbour_codes.shape[0]), neighbour_codes.shape[1]), neighbour_codes.ravel()), 1)
    return counts.argmax(axis=1)


def label_transfer(x: object, batch: object, labels: object, n_neighbors: int = 30) -> float:
    """Leave-one-batch-out kNN classification accuracy over all cells."""
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
    """scib's graph connectivity on the (symmetrised) graph of ``indices``."""
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


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def overlap0(start: object, result: object, n_neighbors: int = 30, n_cells: int = 5000, seed: int = 0) -> float:
    """Mean fraction of shared ``n_neighbors``-NN between two embeddings of the
    same cells, on ``n_cells`` seeded sampled cells (neighbours among them)."""
    a, b = _pair(start, result)
    rows = _sample(a.shape[0], n_cells, seed)
    ia, _ = neighbors(a[rows], n_neighbors)
    ib, _ = neighbors(b[rows], n_neighbors)
    shared = (ia[:, :, None] == ib[:, None, :]).any(axis=2).sum(axis=1)
    return float((shared / n_neighbors).mean())


def strain(start: object, result: object, n_neighbors: int = 20) -> float:
    """Mean over the start's ``n_neighbors``-NN edges of clip(d_new/d_0 − 1, −1, 1)²."""
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


def trustworthiness(start: object, result: object, n_neighbors: int = 30, n_cells: int = 2500, seed: int = 0) -> float:
    """scikit-learn's ``trustworthiness(start, result, n_neighbors)`` on
    ``n_cells`` seeded sampled cells (all of them when fewer)."""
    a, b = _pair(start, result)
    rows = _sample(a.shape[0], n_cells, seed)
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


def evaluate(
    cells: pl.DataFrame | pl.LazyFrame,
    embeddings: Sequence[str] = ("X_pca", "X_ot"),
    *,
    batch_key: str = "batch",
    label_key: str | None = None,
    n_neighbors: int = 30,
    perplexity: float = 30,
    max_cells: int = 100_000,
    seed: int = 0,
) -> pl.DataFrame:
    """All metrics for several embeddings of the same cells, as a tidy frame
    (``embedding``, ``metric``, ``value``).

    Label metrics (``clisi``, ``label_purity``, ``label_transfer``,
    ``graph_connectivity``) need ``label_key``. The first embedding is the
    start the others are compared with (``overlap0``, ``strain``, ``tw``).
    At most ``max_cells`` cells are used: a seeded sample, the same for every
    embedding.
    """
    if isinstance(embeddings, str):
        embeddings = [embeddings]
    if not embeddings:
        raise ValueError("embeddings is empty: name at least one Array(Float32, d) column")
    if not isinstance(max_cells, (int, np.integer)) or max_cells < 2:
        raise ValueError(f"max_cells must be an integer ≥ 2, got {max_cells!r}")
    _positive_k(n_neighbors)  # the count is checked once the cells are read
    lf = cells.lazy()
    names = lf.collect_schema().names()
    wanted = [batch_key, *([label_key] if label_key else []), *embeddings]
    for c in wanted:
        if c not in names:
            raise pl.exceptions.ColumnNotFoundError(f"column '{c}' is not in the cells (columns: {names})")
    from polars_singlecell.io import _seeded_sample

    df = _seeded_sample(lf.select(wanted), max_cells, seed).collect(engine="streaming")
    batch = df[batch_key]
    _, n_b = _codes(batch, batch_key)
    labels = df[label_key] if label_key else None
    n_c = _codes(labels, label_key)[1] if label_key else 0
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
        if x is not start:
            out["overlap0"] = overlap0(start, x, 30, 5000, seed)
            out["strain"] = strain(start, x, 20)
            out["tw"] = trustworthiness(start, x, 30, 2500, seed)
        rows += [(name, k, float(v)) for k, v in out.items()]
    return pl.DataFrame(rows, schema={"embedding": pl.String, "metric": pl.String, "value": pl.Float64}, orient="row")
