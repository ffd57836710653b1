"""Centroid-level optimal-transport integration.

Each batch's centroids (with their cluster mass) are transported to a shared
reference by unbalanced entropic OT in the log domain; a centroid's
displacement is its barycentric image minus itself, shrunk where its mass found
no counterpart, and smoothed over its batch's centroid kNN graph so local
geometry survives. :func:`fit_integration` returns an :class:`IntegrationModel`
that :func:`knn_interpolate` carries to every cell.

The algorithm runs in Rust (``kernels::integrate::fit_integration``; Rust
pipelines call ``expressions::fit_integration``): each batch's OT solve takes
point clouds and returns the plan's row and column masses and weighted sums,
so no cost matrix or plan comes back to Python.

Algorithm (``reference="barycenter"``):

1. Masses are normalised to sum 1 per batch. The reference starts as all
   centroids pooled, each batch weighing 1/B (a batch with more than
   ``n_reference / B`` centroids is reduced by weighted k-means). In the first
   round each batch is matched to the *other* batches' points only: its own
   copy in the reference would cost nothing and pin it in place.
2. Costs are squared Euclidean distances divided by ``scale``: the median
   squared distance from a centroid to its nearest centroid of another batch
   (the typical price of matching across batches), so ``epsilon`` and
   ``reg_m`` mean the same thing on any data.
3. ``n_rounds`` times: solve each batch → reference OT (KL-relaxed marginals,
   weight ``reg_m``; ``ot.sinkhorn_unbalanced(..., reg_type="kl")`` in POT's
   terms, but log-domain: far-apart batches never underflow); move every
   reference point to the mass-weighted mean of the batch points it received
   (the free-support Wasserstein barycentre step). From the second round on,
   a batch's target weighs the other batches' points by the mass its last
   plan delivered to them (their total share kept): points of a population
   the batch lacks receive little, so their weight falls instead of pulling
   the batch's nearest population onto them (class proportions estimated
   as under label shift, an EM step per round; each step over-relaxed,
   new weights ∝ received² / previous, as the rounds are few).
4. Raw displacement of centroid i: Σ_j P_ij y_j / Σ_j P_ij − T_i, and its
   kept fraction s_i = min(1, Σ_j P_ij / a_i) (the share of its mass the plan
   did not drop). T_i is i's image under the batch's own entropic map onto
   itself (same ε, ρ): the blur contracts both images alike, so their
   difference keeps the transport and drops the contraction (far-apart
   batches translate instead of collapsing onto the target's mean).
   Each centroid then takes the mean raw displacement of itself
   and its ``n_neighbors - 1`` nearest centroids of the same batch, weighted
   by s_j and a Gaussian of the distance (bandwidth: the distance to its 3rd
   neighbour), ``smooth_steps`` times, and is scaled by the neighbourhood's
   kernel-weighted mean s: a population with no counterpart (a cell line
   missing from the other batches) loses its mass and does not move beyond
   its batch's common shift: the batch's s·a-weighted mean raw displacement,
   which moves all its centroids (only the remainder is weighed as above).
   In translation passes a batch moves by its common shift alone: the
   first pass, and every next one while the last brought the batches
   closer (the cost unit fell below half) or they are far apart (the unit
   above 100× the median squared distance between neighbouring centroids
   of a batch), until the first local pass. Before the batches overlap the
   cost unit is the size of the batch effect, and a blur that wide mixes
   neighbouring populations' displacements. Translation passes match the
   full targets (no reweighting: with the batches apart, the near side of
   the target receives more and reweighting would stall the approach).
5. Steps 1-4 are a pass. Passes repeat on the centroids as the last one moved
   them, the cost unit re-measured each time: once batches overlap, the unit
   shrinks and the next pass matches finer structure (per-line scaling and
   rotation, which the translation passes leave). They stop after
   ``min_passes``, once a local pass has run and the batches stop
   approaching each other (the unit fell to no less than half the last
   pass's), or at ``max_passes``.
   The displacement is the passes' sum; ``metrics["it"]`` is their number.

With ``reference=<batch>`` that batch's centroids are the fixed reference and
do not move. Everything is deterministic: no random numbers are drawn (the
reference reduction uses ``random_state``), and each row of every kernel is
computed independently of the thread count.

>>> import numpy as np, polars as pl, polars_singlecell as psc
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(120, 2)).astype(np.float32)
>>> table = pl.DataFrame({
...     "batch": np.repeat(["a", "b"], 60),
...     "centroid": pl.Series(np.vstack([x[:60], x[60:] + 5]), dtype=pl.Array(pl.Float32, 2)),
...     "mass": np.ones(120),
... })
>>> model = psc.fit_integration(table)
>>> shift = model.table.group_by("batch", maintain_order=True).agg(pl.col("displacement").arr.get(0).mean())
>>> [round(v, 1) for v in shift["displacement"]]   # most of the way to the middle (2.5)
[2.0, -2.0]
>>> model.metrics["after"]["mix"] > model.metrics["before"]["mix"]
True
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import polars as pl

from polars_singlecell import _internal, metrics
from polars_singlecell._arrays import categories, matrix
from polars_singlecell._checks import seed as check_seed
from polars_singlecell.integration import IntegrationModel

__all__ = ["fit_integration", "ot_integrate"]

def _centroid_metrics(x: np.ndarray, y: np.ndarray, batch: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    """The reference method's metrics on centroids, before (x) and after (y)."""
    k = min(30, len(x) - 1)
    out = {}
    for name, e in (("before", x), ("after", y)):
        idx, _ = metrics.neighbors(e, k)
        out[name] = {"mix": metrics.batch_entropy(idx, batch)[0]}
    k20 = min(20, len(x) - 1)
    out["after"]["overlap0"] = metrics.overlap0(x, y, k, 5000, seed)
    out["after"]["strain"] = metrics.strain(x, y, k20)
    if len(x) > 2 * k + 1:
        out["after"]["tw"] = metrics.trustworthiness(x, y, k, 2500, seed)
    return out


def fit_integration(
    centroids: pl.DataFrame,
    *,
    batch_key: str = "batch",
    centroid: str = "centroid",
    mass: str | None = "mass",
    reference: str = "barycenter",
    epsilon: float = 0.05,
    reg_m: float = 2.0,
    n_rounds: int = 3,
    min_passes: int = 2,
    max_passes: int = 10,
    max_iter: int = 2000,
    tol: float = 1e-4,
    n_neighbors: int = 15,
    smooth_steps: int = 2,
    n_reference: int = 4096,
    random_state: int = 0,
) -> IntegrationModel:
    """Displacements for every centroid of a centroid table: an :class:`IntegrationModel`.

    The table has one row per centroid, e.g. from :func:`fit_centroids`.
    The model's ``metrics`` hold the reference method's ``mix``,
    ``overlap0``, ``strain``, ``tw``, ``it`` and ``n_centroids``
    before/after, the Sinkhorn convergence per batch and round, and the
    parameters. Costs are in units of ``scale``, the typical cross-batch
    matching cost defined in the module docstring; the steps named below
    are the module docstring's.

    Parameters
    ----------
    centroids : polars.DataFrame
        One row per centroid: ``batch_key``, ``centroid``
        (``Array(Float32, d)``, finite) and ``mass`` (positive, finite); at
        least 2 batches of at least 2 centroids each.
    batch_key : str, default "batch"
        The batch column.
    centroid : str, default "centroid"
        The centroid column (renamed ``centroid`` in the model).
    mass : str or None, default "mass"
        The mass column; ``None``: every centroid weighs 1.
    reference : str, default "barycenter"
        ``"barycenter"`` (a free-support barycentre of all batches) or a
        batch, whose centroids are then the fixed reference and do not move.
    epsilon : float, default 0.05
        Entropic blur. Smaller follows the data more sharply but needs more
        Sinkhorn iterations; larger averages over more targets, blending
        neighbouring populations' displacements.
    reg_m : float, default 2.0
        Price of creating or destroying mass. Smaller lets a batch's
        populations without counterpart stay put (cell lines missing from
        some plates) but leaves more of the batch effect; larger mixes more
        and pulls lines without a counterpart into other lines (with 3.0
        instead of 2.0, as ``benches/bench_integration.py`` runs it,
        Harmony's cell lines mixed more, batch entropy 0.555 → 0.721, but
        their label purity fell from 0.999 to 0.847); ``inf`` is balanced
        OT, which forces every population to be matched.
    n_rounds : int, default 3
        Barycentre updates of the reference.
    min_passes, max_passes : int, default 2, 10
        Passes, each on the centroids the last one moved (step 5). A pass
        costs as much as the first. The fit stops once a local pass has run
        and the batches no longer come closer (after ``min_passes``), or at
        ``max_passes`` (then possibly before any local pass);
        ``metrics["params"]["passes"]`` lists each pass's kind ("translate"
        or "local"). Far-apart batches take more passes (batches 1000 apart
        with lines 4 apart: four translations, then one local).
    max_iter, tol : int, float, default 2000, 1e-4
        Sinkhorn stops when no potential moves by more than ``tol`` times
        the largest potential (potentials in units of ε, at least 1), or
        after ``max_iter`` iterations; the metrics report whether it
        converged. Each solve starts from the same rows' potentials of the
        last round or pass (a warm start). On the 1M-cell Tahoe-shaped
        benchmark's 28,672 centroids, 1e-4 moved the displacements by 0.33%
        (RMS, relative) from cold starts at 1e-6, against 0.11% for warm
        starts at 1e-6 (the solver's own path), with the same centroid
        metrics to 4 digits. At a ``tol`` of 1e-5 or more the iterations run
        in float32 (the pipeline benchmark's metrics the same to 4 digits);
        below, float32 until 1e-5, then float64.
    n_neighbors, smooth_steps : int, default 15, 2
        Smoothing of the displacement over each batch's centroid kNN graph
        (self included). 0 steps gives s_i × the raw displacement, unsmoothed.
    n_reference : int, default 4096
        Cap on the barycentre's support size.
    random_state : int, default 0
        Seed of the reference's reduction (weighted k-means), in [0, 2**64).

    Returns
    -------
    IntegrationModel
        The centroid table with ``displacement`` (``Array(Float32, d)``)
        beside ``centroid``, rows in the input's order, and the ``metrics``
        above (``metrics["seconds"]``: the fit's wall time).

    Raises
    ------
    TypeError
        ``centroids`` is not a polars DataFrame.
    ValueError
        A missing column, a non-positive mass or parameter, fewer than 2
        batches or a batch with fewer than 2 centroids, or an unknown
        ``reference``.
    """
    t0 = time.perf_counter()
    if not isinstance(centroids, pl.DataFrame):
        raise TypeError(f"centroids must be a polars DataFrame, got {type(centroids).__name__}")
    for c in [batch_key, centroid] + ([mass] if mass else []):
        if c not in centroids.columns:
            raise ValueError(f"the centroid table has no column '{c}' (columns: {centroids.columns})")
    x = matrix(centroids[centroid])
    if mass:
        w = centroids[mass]
        if w.null_count():
            raise ValueError(f"column '{mass}' is null at row {w.is_null().arg_true()[0]}; every centroid needs a mass")
        w = w.cast(pl.Float64).to_numpy()
        bad = ~(np.isfinite(w) & (w > 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"column '{mass}' holds {w[i]} at row {i}; masses must be positive and finite (drop empty centroids)")
    else:
        w = np.ones(len(x))
    for name, v, lo in (("epsilon", epsilon, 0), ("reg_m", reg_m, 0), ("tol", tol, 0)):
        if not (isinstance(v, (int, float)) and v > lo):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    for name, v in (("n_rounds", n_rounds), ("min_passes", min_passes), ("max_passes", max_passes), ("max_iter", max_iter), ("n_neighbors", n_neighbors), ("n_reference", n_reference)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(smooth_steps, int) or smooth_steps < 0:
        raise ValueError(f"smooth_steps must be a non-negative integer, got {smooth_steps!r}")
    codes, n_b, names = categories(centroids[batch_key], batch_key)
    if n_b < 2:
        raise ValueError(f"column '{batch_key}' has a single batch ({names[0]!r}); integration needs at least 2")
    for g in range(n_b):
        count = int((codes == g).sum())
        if count < 2:
            raise ValueError(f"batch {names[g]!r} has {count} centroid; each batch needs at least 2 (fit more centroids or drop it)")
    if reference != "barycenter" and reference not in names:
        raise ValueError(f"reference must be 'barycenter' or one of the batches {names}, got {reference!r}")

    # The algorithm runs in Rust (kernels::integrate): the batches' OT solves
    # see point clouds, and no cost matrix or plan comes back here.
    disp_s, order, scales, kinds, records = _internal.fit_integration(
        pl.Series(centroid, x, dtype=pl.Array(pl.Float32, x.shape[1])), centroids[batch_key], pl.Series(w, dtype=pl.Float64),
        None if reference == "barycenter" else str(reference), float(epsilon), float(reg_m), n_rounds, min_passes, max_passes,
        max_iter, float(tol), n_neighbors, smooth_steps, n_reference, check_seed(random_state),
    )
    assert order == names, (order, names)  # the same batch codes on both sides
    disp = disp_s.to_numpy()
    convergence = [
        {"round": r, "batch": names[g], "iterations": it, "converged": conv, "delta": delta, "marginal_error": err, "pass": p}
        for p, r, g, it, conv, delta, err in records
    ]

    metrics: dict[str, Any] = _centroid_metrics(x, x + disp, codes, random_state)
    metrics["it"] = len(scales)
    metrics["n_centroids"] = len(x)
    metrics["convergence"] = convergence
    metrics["converged"] = all(c["converged"] for c in convergence)
    metrics["params"] = {
        "reference": reference, "epsilon": epsilon, "reg_m": reg_m, "n_rounds": n_rounds, "max_iter": max_iter,
        "tol": tol, "n_neighbors": n_neighbors, "smooth_steps": smooth_steps, "n_reference": n_reference,
        "random_state": random_state, "min_passes": min_passes, "max_passes": max_passes, "scale": scales[0], "scales": scales, "passes": kinds,
    }
    metrics["seconds"] = time.perf_counter() - t0
    table = centroids.with_columns(
        pl.Series("displacement", disp, dtype=pl.Array(pl.Float32, x.shape[1]))
    )
    rest = [c for c in table.columns if c not in (batch_key, centroid, "displacement", "centroid")]
    table = table.select(batch_key, pl.col(centroid).alias("centroid"), "displacement", *rest)
    return IntegrationModel(table, batch_key=batch_key, metrics=metrics)


def ot_integrate(
    centroid: str | pl.Expr = "centroid",
    batch: str | pl.Expr = "batch",
    mass: str | pl.Expr | None = "mass",
    **params: Any,
) -> pl.Expr:
    """Each centroid's displacement: :func:`fit_integration` as an expression.

    Over a whole centroid table, all its rows at once: it is not elementwise.

    Parameters
    ----------
    centroid : str or polars.Expr, default "centroid"
        The centroids' ``Array(Float32, d)`` column.
    batch : str or polars.Expr, default "batch"
        Their batch column.
    mass : str, polars.Expr or None, default "mass"
        Their mass column; ``None``: every centroid weighs 1.
    **params
        :func:`fit_integration`'s options (``epsilon``, ``reg_m``, ...).

    Returns
    -------
    polars.Expr
        ``Array(Float32, d)`` named ``displacement``, one per centroid, in
        the table's row order.

    Examples
    --------
    >>> import numpy as np, polars as pl, polars_singlecell as psc
    >>> x = np.random.default_rng(1).normal(size=(40, 2)).astype(np.float32)
    >>> t = pl.DataFrame({"batch": np.repeat(["a", "b"], 20),
    ...                   "centroid": pl.Series(np.vstack([x[:20], x[20:] + 4]), dtype=pl.Array(pl.Float32, 2)),
    ...                   "mass": np.ones(40)})
    >>> t.with_columns(psc.ot_integrate()).schema["displacement"]
    Array(Float32, shape=(2,))
    """
    as_expr = lambda c: pl.col(c) if isinstance(c, str) else c
    fields = [as_expr(centroid).alias("centroid"), as_expr(batch).alias("batch")]
    if mass is not None:
        fields.append(as_expr(mass).alias("mass"))

    def run(s: pl.Series) -> pl.Series:
        table = s.struct.unnest()
        model = fit_integration(table, batch_key="batch", centroid="centroid", mass="mass" if mass is not None else None, **params)
        return model.table["displacement"]

    return pl.struct(fields).map_batches(run, return_dtype=pl.dtype_of(as_expr(centroid)), is_elementwise=False).alias("displacement")
