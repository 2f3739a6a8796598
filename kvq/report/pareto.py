"""The Pareto front of (bits per element, perplexity) points, both minimised."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["pareto_front"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when minimising both coordinates.

    A point *dominates* another when it is ``<=`` in both coordinates and ``<`` in at least one.
    The result does not depend on the order of the two coordinates, so ``(bits, ppl)`` and
    ``(ppl, bits)`` give the same set. Ties:

    * equal in one coordinate: only the one better in the other is kept
      (``(4, 10)`` dominates ``(4, 12)`` and ``(6, 10)``);
    * exact duplicates do not dominate each other: all copies are kept (they are equally good);
    * a point with a NaN or infinite coordinate is never on the front and dominates nothing.

    Args:
        points: ``(x, y)`` pairs.

    Returns:
        Sorted indices into ``points`` (``O(n log n)``).
    """
    finite = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    finite.sort(key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best = math.inf  # lowest y among points with a strictly smaller x
    k = 0
    while k < len(finite):
        x = points[finite[k]][0]
        same_x = []
        while k < len(finite) and points[finite[k]][0] == x:
            same_x.append(finite[k])
            k += 1
        y_min = points[same_x[0]][1]  # sorted by (x, y): the first has the lowest y
        if y_min < best:
            front.extend(i for i in same_x if points[i][1] == y_min)
            best = y_min
    return sorted(front)
