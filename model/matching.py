"""Which interest learns from which target: HyMiRec's disentangled multi-interest learning.

A user has ``K`` interest embeddings and ``W`` next items (targets). Each target trains exactly one
interest, with a softmax over all items (the positive is the target). Two rules pick the interest:

- ``"argmax"`` (ComiRec, Cen et al. KDD 2020, sec. 3.4): every target trains the interest most
  similar to it. Nothing stops one interest from taking every target, so interests can collapse.
- ``"hungarian"`` (HyMiRec's disentangled multi-interest learning, Zhou et al. 2025,
  arXiv 2510.13738): the targets are first grouped by similarity (spherical k-means into at most
  ``K`` groups), then groups are matched one-to-one to interests with the Hungarian algorithm
  (Kuhn 1955; ``scipy.optimize.linear_sum_assignment``) so that the total similarity between each
  interest and the targets of its group is largest. Targets that belong together train the same
  interest and different groups train different interests, which is what disentangles them.

The paper's text available to us names the module (multiple interest queries, disentangled
learning) but not its grouping rule; the k-means grouping and the "sum of member similarities"
matching score are our choices: with them the Hungarian rule is exactly ComiRec's objective
(total target-interest similarity) under the constraints "one group, one interest" and "one
interest, at most one group". Assignments are computed without gradients (a discrete choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "Assignment",
    "Grouping",
    "argmax_assignment",
    "assign_targets",
    "diversity_penalty",
    "group_targets",
    "hungarian_assignment",
    "match_groups",
    "multi_interest_loss",
]

Assignment = Literal["hungarian", "argmax"]

_SAME_POINT = 1e-6  # cosine distance under which two targets count as the same point


@dataclass(frozen=True)
class Grouping:
    """Per-user groups of targets: ``labels`` (B, W) in 0..G-1 (-1 = no target), ``present``
    (B, G) whether group g has members, ``centroids`` (B, G, D) unit mean directions."""

    labels: Tensor
    present: Tensor
    centroids: Tensor


@torch.no_grad()
def group_targets(vectors: Tensor, valid: Tensor, max_groups: int, iters: int = 10) -> Grouping:
    """Spherical k-means of each user's valid targets into at most ``max_groups`` groups.

    ``vectors`` (B, W, D), ``valid`` (B, W). Initialisation is farthest-point (Gonzalez 1985):
    the first valid target, then repeatedly the target least similar to every chosen centroid;
    a new group opens only if that target is not a duplicate of one already chosen, so a user
    with ``n`` distinct targets gets ``min(n, max_groups)`` groups. Then ``iters`` Lloyd steps.
    Deterministic: no random numbers.
    """
    x = F.normalize(vectors.float(), dim=-1)
    batch, _, dim = x.shape
    rows = torch.arange(batch, device=x.device)
    centroids = x.new_zeros(batch, max_groups, dim)
    active = torch.zeros(batch, max_groups, dtype=torch.bool, device=x.device)
    first = valid.int().argmax(dim=1)  # index of the first valid target (0 when none)
    centroids[:, 0] = x[rows, first]
    active[:, 0] = valid.any(dim=1)
    closest = torch.einsum("bwd,bd->bw", x, centroids[:, 0])  # best cosine to a chosen centroid
    for group in range(1, max_groups):
        distance = (1.0 - closest).masked_fill(~valid, -1.0)
        far_distance, far = distance.max(dim=1)
        opens = far_distance > _SAME_POINT
        centroids[:, group] = torch.where(opens[:, None], x[rows, far], 0.0)
        active[:, group] = opens
        new = torch.einsum("bwd,bd->bw", x, centroids[:, group])
        closest = torch.where(opens[:, None], torch.maximum(closest, new), closest)
    labels = _nearest(x, centroids, active)
    for _ in range(iters):
        centroids, active = _means(x, labels, valid, centroids, max_groups)
        labels = _nearest(x, centroids, active)
    centroids, present = _means(x, labels, valid, centroids, max_groups)
    return Grouping(labels.masked_fill(~valid, -1), present, centroids)


def _nearest(x: Tensor, centroids: Tensor, active: Tensor) -> Tensor:
    """(B, W) index of the most similar active centroid (ties to the lowest index)."""
    sims = torch.einsum("bwd,bgd->bwg", x, centroids).masked_fill(~active[:, None, :], -torch.inf)
    return sims.argmax(dim=-1)


def _means(
    x: Tensor, labels: Tensor, valid: Tensor, previous: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    """Unit mean direction of each group's valid members; an empty group keeps ``previous``."""
    members = F.one_hot(labels, groups).to(x.dtype) * valid[..., None].to(x.dtype)  # (B, W, G)
    sums = torch.einsum("bwg,bwd->bgd", members, x)
    present = members.sum(dim=1) > 0
    return torch.where(present[..., None], F.normalize(sums, dim=-1), previous), present


def match_groups(similarity: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """For a (K interests, G groups) similarity matrix with G <= K, the interest of each group.

    The one-to-one assignment of largest total similarity (Hungarian algorithm on the negated
    matrix); returns (G,) interest indices, all distinct.
    """
    sims = np.asarray(similarity, dtype=np.float64)
    if sims.ndim != 2 or sims.shape[1] > sims.shape[0]:
        raise ValueError(f"need a (K, G) matrix with G <= K; got shape {sims.shape}")
    interest, group = linear_sum_assignment(-sims)
    out = np.empty(sims.shape[1], dtype=np.int64)
    out[group] = interest
    return out


@torch.no_grad()
def hungarian_assignment(
    interests: Tensor, targets: Tensor, valid: Tensor, kmeans_iters: int = 10
) -> Tensor:
    """(B, W) interest index per target (-1 = no target): group, then match groups to interests.

    ``interests`` (B, K, D), ``targets`` (B, W, D) target item embeddings. The score of interest
    k for group g is the sum over g's members t of <interest_k, t>.
    """
    num_interests = interests.shape[1]
    grouping = group_targets(targets, valid, num_interests, kmeans_iters)
    members = F.one_hot(grouping.labels.clamp(min=0), num_interests).to(targets.dtype)
    members = members * valid[..., None].to(targets.dtype)  # (B, W, G)
    scores = torch.einsum("bkd,bwd,bwg->bkg", interests, targets, members).float().cpu().numpy()
    present = grouping.present.cpu().numpy()
    group_interest = np.zeros(present.shape, dtype=np.int64)  # (B, G)
    for user in np.flatnonzero(present.any(axis=1)):
        groups = np.flatnonzero(present[user])
        group_interest[user, groups] = match_groups(scores[user][:, groups])
    per_group = torch.from_numpy(group_interest).to(interests.device)
    return per_group.gather(1, grouping.labels.clamp(min=0)).masked_fill(~valid, -1)


@torch.no_grad()
def argmax_assignment(interests: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """(B, W) ComiRec's rule: each target to its most similar interest (-1 = no target)."""
    return torch.einsum("bkd,bwd->bwk", interests, targets).argmax(dim=-1).masked_fill(~valid, -1)


def assign_targets(
    interests: Tensor, targets: Tensor, valid: Tensor, rule: Assignment, kmeans_iters: int = 10
) -> Tensor:
    """(B, W) interest per target by ``rule``; inputs are detached (the choice is discrete) and
    compared in float32, outside any autocast region (scipy needs float32/64 numbers)."""
    interests, targets = interests.detach().float(), targets.detach().float()
    with torch.autocast(interests.device.type, enabled=False):
        if rule == "hungarian":
            return hungarian_assignment(interests, targets, valid, kmeans_iters)
        if rule == "argmax":
            return argmax_assignment(interests, targets, valid)
    raise ValueError(f"assignment must be 'hungarian' or 'argmax'; got {rule!r}")


def multi_interest_loss(
    interests: Tensor,
    items: Tensor,
    targets: Tensor,
    assignment: Tensor,
    temperature: float,
    bias: Tensor | None = None,
) -> Tensor:
    """Mean softmax cross-entropy over all items (row 0, padding, excluded) of each target
    against the interest it is assigned to: -log softmax(<u_k, e_i> / temperature + b_i)[target]
    (``bias`` (N + 1,) per-item logits, or none)."""
    chosen = assignment >= 0
    if not bool(chosen.any()):
        return interests.sum() * 0.0  # no targets in the batch: a zero that keeps the graph
    dim = interests.shape[-1]
    index = assignment.clamp(min=0)[..., None].expand(-1, -1, dim)
    user_vectors = interests.gather(1, index)[chosen]  # (M, D)
    logits = user_vectors @ items.T / temperature  # (M, N + 1)
    if bias is not None:
        logits = logits + bias
    logits[:, 0] = -torch.inf
    return F.cross_entropy(logits, targets[chosen])


def diversity_penalty(interests: Tensor) -> Tensor:
    """Mean squared cosine between different interests of the same user (0 when orthogonal)."""
    unit = F.normalize(interests, dim=-1)
    gram = unit @ unit.transpose(1, 2)  # (B, K, K)
    k = interests.shape[1]
    if k < 2:
        return interests.sum() * 0.0
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=interests.device)
    return gram[:, off_diagonal].pow(2).mean()
