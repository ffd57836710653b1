"""Centroid-level optimal-transport integration.

Each batch's centroids (with their cluster mass) are transported to a shared
reference by unbalanced entropic OT in the log domain; a centroid's
displacement is its barycentric image minus itself, shrunk where its mass found
no counterpart, and smoothed over its batch's centroid kNN graph so local
geometry survives. :func:`fit_integration` returns an :class:`IntegrationModel`
that :func:`knn_interpolate` carries to every cell.

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
   as under label shift).
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

from polars_singlecell import _internal
from polars_singlecell import metrics as _m
from polars_singlecell.integration import IntegrationModel

__all__ = ["fit_integration", "ot_integrate"]

# Passes continue while the batches still approach: the cost unit (median
# squared distance to the nearest centroid of another batch) fell below this
# fraction of the last pass's.
APPROACH = 0.5
# Batches are far apart while the cost unit exceeds this many times the
# median squared distance between neighbouring centroids of one batch (10×
# farther): passes then translate each batch as a whole.
FAR_APART = 100.0


def _sqdist(x: np.ndarray, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Squared Euclidean distances divided by ``scale``, in float64, never
    negative. In place on the one matrix: three temporaries of a 2048 × 4096
    matrix took a tenth of fit_integration."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    d = x @ y.T
    d *= -2.0
    d += (x * x).sum(1)[:, None]
    d += (y * y).sum(1)[None, :]
    np.maximum(d, 0.0, out=d)
    d /= scale
    return d


def _solve(a, b, cost, epsilon, reg_m, max_iter, tol, init=None):
    """The plan, iterations, converged, last change and row potentials; ``init``
    warm-starts the row potentials (a previous solve's for the same rows)."""
    init = None if init is None else pl.Series(init, dtype=pl.Float64)
    plan, phi, iters, converged, delta = _internal.sinkhorn(
        pl.Series(a, dtype=pl.Float64), pl.Series(b, dtype=pl.Float64), pl.Series(cost.ravel()), epsilon, reg_m, max_iter, tol, init
    )
    return plan.to_numpy().reshape(cost.shape), iters, converged, delta, phi.to_numpy()


def _reduce(points: np.ndarray, weights: np.ndarray, n: int, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """At most n weighted points: weighted k-means when there are more."""
    if len(points) <= n:
        return points, weights
    from polars_singlecell.centroids import kmeans_centroids

    out = pl.DataFrame({"x": pl.Series(points.astype(np.float32), dtype=pl.Array(pl.Float32, points.shape[1])), "w": weights}).select(
        kmeans_centroids("x", n_centroids=n, weights="w", random_state=random_state)
    )
    c = np.asarray(out["centroids"].struct.field("centroid").explode().to_list(), dtype=np.float32)
    w = out["centroids"].struct.field("mass").explode().to_numpy()
    keep = w > 0
    return c[keep], w[keep] / w[keep].sum()


def _centroid_metrics(x: np.ndarray, y: np.ndarray, batch: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    """The reference method's metrics on centroids, before (x) and after (y)."""
    k = min(30, len(x) - 1)
    out = {}
    for name, e in (("before", x), ("after", y)):
        idx, _ = _m.neighbors(e, k)
        out[name] = {"mix": _m.batch_entropy(idx, batch)[0]}
    k20 = min(20, len(x) - 1)
    out["after"]["overlap0"] = _m.overlap0(x, y, k, 5000, seed)
    out["after"]["strain"] = _m.strain(x, y, k20)
    if len(x) > 2 * k + 1:
        out["after"]["tw"] = _m.trustworthiness(x, y, k, 2500, seed)
    return out


def _within(x: np.ndarray, groups: list[np.ndarray]) -> float:
    """The median squared distance from a centroid to its nearest centroid of
    the same batch: the scale of the structure within batches."""
    return float(np.median(np.concatenate([_m.neighbors(x[rows], 1)[1].ravel().astype(np.float64) ** 2 for rows in groups])))


def _cost_unit(x: np.ndarray, groups: list[np.ndarray], codes: np.ndarray) -> float:
    """The median squared distance from a centroid to its nearest centroid of
    another batch: the typical price of matching across batches."""
    near = []
    for g, rows in enumerate(groups):
        others = np.flatnonzero(codes != g)
        idx, dist = _internal.knn_search(_m._series(x[rows]), _m._series(x[others]), 1)
        near.append(dist.to_numpy().astype(np.float64).ravel() ** 2)
    near = np.concatenate(near)
    near = near[near > 0]  # centroids shared exactly by two batches say nothing of the scale
    return float(np.median(near)) if near.size else 0.0


def _reweigh(target: np.ndarray, received: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The target with the other batches' points reweighted to what this
    batch's last plan delivered to them (their total share unchanged).

    A reference point of a population this batch lacks keeps receiving little
    (only the mass the entropic plan leaks to it), so its weight falls round
    by round instead of pulling the batch's nearest population onto it: the
    fixed point is the target whose proportions the batch can fill, as when
    estimating class proportions under label shift. The batch's own points
    (first round: absent) keep their weight, or they would pin it in place.
    """
    out = target.copy()
    share = target[other].sum()
    got = np.maximum(received[other], 0.0)
    if share > 0 and got.sum() > 0:
        out[other] = got / got.sum() * share
    return out


def _displace(x, a, groups, codes, names, reference, scale, epsilon, reg_m, n_rounds, max_iter, tol, n_neighbors, smooth_steps, n_reference, random_state, convergence, warm, translate):
    """One pass of the algorithm: every centroid's displacement (float64).
    ``warm`` holds each batch's last row potentials, per kind of solve, and is
    updated: the next solve of the same rows starts from them. ``translate``:
    each batch moves as a whole (see fit_integration's pass rule)."""
    n_b = len(groups)
    if reference == "barycenter":
        ref_batch = None
        # Every batch's centroids, each batch weighing 1/B; a batch with more
        # than its share of n_reference points is reduced by weighted k-means.
        # `origin` remembers which batch each reference point came from.
        parts = [_reduce(x[rows], a[g], max(n_reference // n_b, 1), random_state) for g, rows in enumerate(groups)]
        y = np.vstack([p[0] for p in parts])
        nu = np.concatenate([p[1] / n_b for p in parts])
        origin = np.concatenate([np.full(len(p[0]), g) for g, p in enumerate(parts)])
    elif reference in names:
        ref_batch = names.index(reference)
        y, nu = _reduce(x[groups[ref_batch]], a[ref_batch], n_reference, random_state)
        origin = np.full(len(y), ref_batch)
    else:
        raise ValueError(f"reference must be 'barycenter' or one of the batches {names}, got {reference!r}")
    y = y.astype(np.float64)


    images = [None] * n_b
    kept = [None] * n_b
    received = [None] * n_b  # per batch: the mass its last plan delivered to each reference point
    for r in range(n_rounds):
        num = np.zeros_like(y)
        den = np.zeros(len(y))
        for g, rows in enumerate(groups):
            if g == ref_batch:
                continue
            xb = x[rows].astype(np.float64)
            # First round of a barycentre: the reference still holds this
            # batch's own centroids, which it would match at zero cost and so
            # never move; it sees only the other batches' points.
            cols = np.flatnonzero(origin != g) if (ref_batch is None and r == 0) else np.arange(len(y))
            target = nu[cols] / nu[cols].sum()
            if received[g] is not None and not translate:
                target = _reweigh(target, received[g][cols], origin[cols] != g)
            plan, iters, conv, delta, warm[g, "ref"] = _solve(a[g], target, _sqdist(xb, y[cols], scale), epsilon, reg_m,
                                                              max_iter, tol, warm.get((g, "ref")))
            row = plan.sum(1)
            images[g] = (plan @ y[cols]) / np.maximum(row, 1e-300)[:, None]
            kept[g] = np.minimum(1.0, row / a[g])
            num[cols] += plan.T @ xb
            den[cols] += plan.sum(0)
            received[g] = np.zeros(len(y))
            received[g][cols] = plan.sum(0)
            convergence.append({
                "round": r, "batch": names[g], "iterations": iters, "converged": conv, "delta": delta,
                "marginal_error": float(np.abs(row - a[g]).sum() + np.abs(plan.sum(0) - target).sum()),
            })
        if ref_batch is None and r == 0:
            # Each point also stands for its own batch (which did not see it
            # this round), weighted like one other batch: with two batches the
            # points move to the midpoints instead of swapping sides.
            w = nu * n_b / (n_b - 1)
            num += w[:, None] * y
            den += w
        if ref_batch is None and r < n_rounds - 1:
            moved = den > 1e-12 * den.max()
            y[moved] = num[moved] / den[moved, None]

    disp = np.zeros_like(x, dtype=np.float64)
    for g, rows in enumerate(groups):
        if g == ref_batch:
            continue
        keep = kept[g]
        # The entropic map contracts: at a blur wide next to the batch's
        # structure every centroid's image is near the target's mean. The
        # batch's map onto itself contracts alike, so the difference of the
        # two images keeps the transport and drops the contraction (far-apart
        # batches: a translation, not a collapse onto one point).
        xb = x[rows].astype(np.float64)
        plan, *_, warm[g, "self"] = _solve(a[g], a[g], _sqdist(xb, xb, scale), epsilon, reg_m, max_iter, tol, warm.get((g, "self")))
        raw = images[g] - (plan @ xb) / np.maximum(plan.sum(1), 1e-300)[:, None]
        k = min(n_neighbors, len(rows)) - 1
        nb = np.arange(len(rows))[:, None]
        kern = np.ones((len(rows), 1))
        if smooth_steps and k >= 1:
            idx, dist = _m.neighbors(x[rows], k)
            nb = np.concatenate([nb, idx], axis=1)
            # Gaussian weights with a bandwidth of the distance to the 3rd
            # nearest centroid: the neighbourhood is a few centroids wide, so
            # populations next to each other keep their own displacements.
            h = np.maximum(dist[:, min(2, k - 1)].astype(np.float64), 1e-12)
            d_all = np.concatenate([np.zeros((len(rows), 1)), dist.astype(np.float64)], axis=1)
            kern = np.exp(-0.5 * (d_all / h[:, None]) ** 2)
        # A centroid takes the kept-mass- and kernel-weighted mean displacement
        # of its neighbourhood (its edge, where the plan dropped mass, borrows
        # from its matched core), scaled by how much mass the neighbourhood
        # kept (a population with no counterpart stays).
        # The batch's common shift (its kept-mass-weighted mean displacement)
        # moves every centroid: a batch effect reaches its populations without
        # counterpart too, and where batches are far apart the plan drops
        # mass in proportion to distance, uniformly, which says nothing about
        # missing populations. Only the rest is weighed by kept mass.
        wk = a[g] * keep
        shift = (wk[:, None] * raw).sum(0) / max(wk.sum(), 1e-300)
        if translate:
            # A translation pass: the whole batch moves by its shift. Before
            # the batches overlap the cost unit is the size of the batch
            # effect and the blur is as wide: local displacements then mix
            # neighbouring populations (measured when this was chosen, on the
            # 1M-cell pipeline benchmark's centroids: label purity 0.74 with
            # them in the first pass, 0.82 without).
            disp[rows] = shift
            continue
        d = raw - shift
        for step in range(max(smooth_steps, 1)):
            w = kern * keep[nb]
            d = (w[:, :, None] * d[nb]).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-300)[:, None]
        d *= np.minimum(1.0, (kern * keep[nb]).sum(axis=1) / kern.sum(axis=1))[:, None]
        disp[rows] = d + shift

    return disp


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
    """Displacements for every centroid of a centroid table (one row per
    centroid, e.g. from :func:`fit_centroids`): an :class:`IntegrationModel`
    whose ``metrics`` hold the reference method's ``mix``, ``overlap0``,
    ``strain``, ``tw``, ``it`` and ``n_centroids`` before/after, and the
    Sinkhorn convergence per batch and round.

    Parameters (costs are in units of ``scale``, the typical cross-batch
    matching cost defined in the module docstring):

    - ``epsilon`` (0.05): entropic blur. Smaller follows the data more sharply
      but needs more Sinkhorn iterations; larger averages over more targets,
      blending neighbouring populations' displacements.
    - ``reg_m`` (2.0): price of creating or destroying mass. Smaller lets a
      batch's populations without counterpart stay put (cell lines missing
      from some plates) but leaves more of the batch effect; larger mixes more
      and pulls lines without a counterpart into other lines (with 3.0
      instead of 2.0, as ``benches/bench_integration.py`` runs it, Harmony's
      cell lines mixed more, batch entropy 0.555 → 0.721, but their label
      purity fell from 0.999 to 0.847);
      ``inf`` is balanced OT, which forces every population to be matched.
    - ``n_rounds`` (3): barycentre updates of the reference.
    - ``min_passes`` (2), ``max_passes`` (10): passes, each on the centroids
      the last one moved (step 5). A pass costs as much as the first. The
      fit stops once a local pass has run and the batches no longer come
      closer (after ``min_passes``), or at ``max_passes`` (then possibly
      before any local pass); ``metrics["params"]["passes"]`` lists each pass's kind
      ("translate" or "local"). Far-apart batches take more passes (batches
      1000 apart with lines 4 apart: four translations, then one local).
    - ``max_iter`` (2000), ``tol`` (1e-4): Sinkhorn stops when no potential
      moves by more than ``tol`` times the largest potential (potentials in
      units of ε, at least 1); the metrics report whether it converged.
      Each solve starts from the same rows' potentials of the last round or
      pass (a warm start). On the 1M-cell Tahoe-shaped benchmark's 28,672
      centroids, 1e-4 moved the displacements by 0.33% (RMS, relative) from
      cold starts at 1e-6, against 0.11% for warm starts at 1e-6 (the
      solver's own path), with the same centroid metrics to 4 digits, and
      took 137 s instead of 867 s (float64 iterations then). At a ``tol``
      of 1e-5 or more the iterations run in float32 (the pipeline
      benchmark's integration stage 126 → 49 s, with the same metrics to 4
      digits); below, float32 until 1e-5, then float64.
    - ``n_neighbors`` (15), ``smooth_steps`` (2): smoothing of the
      displacement over each batch's centroid kNN graph (self included).
      0 steps gives s_i × the raw displacement, unsmoothed.
    - ``n_reference`` (4096): cap on the barycentre's support size.
    """
    t0 = time.perf_counter()
    if not isinstance(centroids, pl.DataFrame):
        raise TypeError(f"centroids must be a polars DataFrame, got {type(centroids).__name__}")
    for c in [batch_key, centroid] + ([mass] if mass else []):
        if c not in centroids.columns:
            raise ValueError(f"the centroid table has no column '{c}' (columns: {centroids.columns})")
    x = _m._matrix(centroids[centroid])
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
    codes, n_b, names = _m._categories(centroids[batch_key], batch_key)
    if n_b < 2:
        raise ValueError(f"column '{batch_key}' has a single batch ({names[0]!r}); integration needs at least 2")
    groups = [np.flatnonzero(codes == g) for g in range(n_b)]
    for g, rows in enumerate(groups):
        if len(rows) < 2:
            raise ValueError(f"batch {names[g]!r} has {len(rows)} centroid; each batch needs at least 2 (fit more centroids or drop it)")
    a = [w[rows] / w[rows].sum() for rows in groups]

    convergence: list[dict] = []
    pos = x.astype(np.float64)
    scales: list[float] = []
    kinds: list[str] = []
    warm: dict = {}
    for it in range(max_passes):
        here = pos.astype(np.float32)
        scale = _cost_unit(here, groups, codes)
        if it == 0 and not scale > 0:
            raise ValueError("the batches' centroids coincide; there is nothing to integrate")
        approaching = it == 0 or scale <= APPROACH * scales[-1]
        local_done = "local" in kinds
        if not scale > 0 or (it >= min_passes and local_done and not approaching):
            break  # the batches stopped approaching each other
        # Translate while the batches still approach by translating (or are
        # far apart); then refine locally (see the module docstring, step 5).
        translate = not local_done and (approaching or scale > FAR_APART * _within(here, groups))
        first = len(convergence)
        pos += _displace(here, a, groups, codes, names, reference, scale, epsilon, reg_m, n_rounds, max_iter, tol,
                         n_neighbors, smooth_steps, n_reference, random_state, convergence, warm, translate=translate)
        for c in convergence[first:]:
            c["pass"] = it
        scales.append(scale)
        kinds.append("translate" if translate else "local")
    disp = (pos - x).astype(np.float32)

    metrics: dict[str, Any] = _centroid_metrics(x, x + disp, codes, random_state)
    metrics["it"] = len(scales)
    metrics["n_centroids"] = int(len(x))
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
    """Each centroid's displacement, ``Array(Float32, d)`` named
    ``displacement``: :func:`fit_integration` as an expression over a whole
    centroid table (all its rows at once: it is not elementwise). ``params``
    are :func:`fit_integration`'s.

    >>> import numpy as np, polars as pl, polars_singlecell as psc
    >>> x = np.random.default_rng(1).normal(size=(40, 2)).astype(np.float32)
    >>> t = pl.DataFrame({"batch": np.repeat(["a", "b"], 20),
    ...                   "centroid": pl.Series(np.vstack([x[:20], x[20:] + 4]), dtype=pl.Array(pl.Float32, 2)),
    ...                   "mass": np.ones(40)})
    >>> t.with_columns(psc.ot_integrate()).schema["displacement"]
    Array(Float32, shape=(2,))
    """
    as_expr = lambda c: pl.col(c) if isinstance(c, str) else c  # noqa: E731
    fields = [as_expr(centroid).alias("centroid"), as_expr(batch).alias("batch")]
    if mass is not None:
        fields.append(as_expr(mass).alias("mass"))

    def run(s: pl.Series) -> pl.Series:
        table = s.struct.unnest()
        model = fit_integration(table, batch_key="batch", centroid="centroid", mass="mass" if mass is not None else None, **params)
        return model.table["displacement"]

    return pl.struct(fields).map_batches(run, return_dtype=pl.dtype_of(as_expr(centroid)), is_elementwise=False).alias("displacement")
