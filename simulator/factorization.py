"""Implicit-feedback matrix factorisation by alternating least squares (the simulator's users).

Hu, Koren & Volinsky 2008, "Collaborative Filtering for Implicit Feedback Datasets" (ICDM):
every observed (user, item) pair has preference ``p = 1`` and confidence ``c = 1 + alpha``, every
other pair ``p = 0`` and ``c = 1``; the factors minimise

    sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + lambda (sum_u |x_u|^2 + sum_i |y_i|^2)

by alternating exact solves (their eq. 4): ``x_u = (Y'Y + alpha Y_u'Y_u + lambda I)^-1 (1 + alpha)
Y_u' 1``, with ``Y_u`` the rows of the items ``u`` consumed, and the same for items. Each half-step
is the exact minimiser given the other side, so the objective never increases.

Pure numpy, seeded, no I/O: it is fitted on the ratings *independently of every served model*, so
the simulated users' tastes do not favour one model's inductive bias by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.errors import ConfigError

__all__ = ["ImplicitALS", "ImplicitFactors", "fit_implicit_als", "implicit_als_objective"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ImplicitALS:
    """Hyper-parameters of :func:`fit_implicit_als`."""

    factors: int = 32
    alpha: float = 10.0  # confidence of an observed pair: 1 + alpha
    regularization: float = 1.0
    iterations: int = 15
    init_scale: float = 0.01

    def __post_init__(self) -> None:
        if self.factors < 1 or self.iterations < 1:
            raise ConfigError(f"ImplicitALS needs factors >= 1 and iterations >= 1; got {self}")
        if not (self.alpha >= 0 and self.regularization > 0 and self.init_scale > 0):
            raise ConfigError(f"ImplicitALS needs alpha >= 0, regularization > 0; got {self}")


@dataclass(frozen=True, eq=False)
class ImplicitFactors:
    """User factors ``(num_users, f)``, item factors ``(num_items, f)``, objective per iteration."""

    users: FloatArray
    items: FloatArray
    objective: list[float]


def _pairs(
    users: npt.ArrayLike, items: npt.ArrayLike, num_users: int, num_items: int
) -> tuple[IntArray, IntArray]:
    u = np.asarray(users, dtype=np.int64).reshape(-1)
    i = np.asarray(items, dtype=np.int64).reshape(-1)
    if u.shape != i.shape or len(u) == 0:
        raise ConfigError(
            f"need equally long, non-empty user and item rows; got {u.shape}, {i.shape}"
        )
    if u.min() < 0 or u.max() >= num_users or i.min() < 0 or i.max() >= num_items:
        raise ConfigError(
            f"rows out of range: users must be in 0..{num_users - 1}, items in 0..{num_items - 1}"
        )
    # Repeats of one pair count once (the preference is binary).
    keys = np.unique(u * num_items + i)
    return keys // num_items, keys % num_items


def _half_step(
    fixed: FloatArray, owners: IntArray, members: IntArray, count: int, config: ImplicitALS
) -> FloatArray:
    """Solve every owner's factor given the other side ``fixed``; ``members`` are the other
    side's rows of each observed pair, ``owners`` sorted."""
    f = fixed.shape[1]
    gram = fixed.T @ fixed + config.regularization * np.eye(f)
    out = np.zeros((count, f))
    bounds = np.searchsorted(owners, np.arange(count + 1))
    for row in range(count):
        observed = fixed[members[bounds[row] : bounds[row + 1]]]
        if not len(observed):
            continue  # nothing observed: the regularised minimiser is 0
        system = gram + config.alpha * observed.T @ observed
        out[row] = np.linalg.solve(system, (1.0 + config.alpha) * observed.sum(axis=0))
    return out


def implicit_als_objective(
    factors: ImplicitFactors | tuple[FloatArray, FloatArray],
    users: npt.ArrayLike,
    items: npt.ArrayLike,
    config: ImplicitALS,
) -> float:
    """The weighted objective above, computed densely (for tests and the fit's log)."""
    x, y = (factors.users, factors.items) if isinstance(factors, ImplicitFactors) else factors
    u, i = _pairs(users, items, len(x), len(y))
    preference = np.zeros((len(x), len(y)))
    preference[u, i] = 1.0
    confidence = 1.0 + config.alpha * preference
    residual = preference - x @ y.T
    penalty = config.regularization * (np.sum(x * x) + np.sum(y * y))
    return float(np.sum(confidence * residual * residual) + penalty)


def fit_implicit_als(
    users: npt.ArrayLike,
    items: npt.ArrayLike,
    num_users: int,
    num_items: int,
    config: ImplicitALS | None = None,
    seed: int = 0,
    track_objective: bool = False,
) -> ImplicitFactors:
    """Factorise the observed (user row, item row) pairs; see the module docstring."""
    config = config or ImplicitALS()
    u, i = _pairs(users, items, num_users, num_items)
    rng = np.random.default_rng(seed)
    y = rng.normal(0.0, config.init_scale, size=(num_items, config.factors))
    by_user = np.lexsort((i, u))
    by_item = np.lexsort((u, i))
    x = np.zeros((num_users, config.factors))
    objective: list[float] = []
    for _ in range(config.iterations):
        x = _half_step(y, u[by_user], i[by_user], num_users, config)
        y = _half_step(x, i[by_item], u[by_item], num_items, config)
        if track_objective:
            objective.append(implicit_als_objective((x, y), u, i, config))
    return ImplicitFactors(users=x, items=y, objective=objective)
