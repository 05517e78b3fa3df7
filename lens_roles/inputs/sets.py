"""The one set API shared by :class:`~lens_roles.inputs.prompts.PromptSet`,
:class:`~lens_roles.inputs.prompts.PairSet` and :class:`~lens_roles.inputs.questions.QuestionSet`,
and the one split rule.

Every set is a frozen dataclass with a ``name``, a ``source`` and a tuple of items; through
:class:`ItemSet` each has ``len``, iteration over its items, ``head(n)``, ``subset(indices)``,
``halves()``, ``fingerprint()`` and ``split(size, *, seed=None, rest=None)``.

The split (:func:`split_indices`) means one thing everywhere: a *first* part and a *rest*.

* ``size`` is a fraction of the set in (0, 1) (rounded, both parts keep at least one item:
  :func:`split_point`) or a count of items >= 1;
* ``rest`` caps the second part (default: every other item);
* without a ``seed``, the first part is the first items in order and the rest the items after
  them; with a ``seed``, ``random.Random(seed).shuffle`` orders the positions, the first part is
  the first shuffled positions and the rest the next ones, and each part is sorted, so that both
  keep the file order.

When a count ``size`` plus ``rest`` ask for more items than there are, the parts are cut to fit:
the rest keeps at least ``min(rest, n // 2)`` items, the first part keeps at least one, and the rest
takes every item the first part leaves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import random
from typing import Any, ClassVar, Iterator, Sequence

from lens_roles.errors import DataError


def fingerprint(items) -> str:
    """A short content hash of JSON-serialisable data (the 'dataset hash' of provenance)."""
    blob = json.dumps(items, ensure_ascii=False, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def split_point(n: int, fraction: float, what: str = "set") -> int:
    """Items before the split when the first ``fraction`` of ``n`` builds and the rest is held out.

    Both sides keep at least one item.
    """
    if not 0 < fraction < 1:
        raise DataError(f"split fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise DataError(f"{what} has {n} item(s); cannot split it")
    return max(1, min(n - 1, round(n * fraction)))


def split_indices(n: int, size: float | int, *, seed: int | None = None, rest: int | None = None,
                  what: str = "set") -> tuple[list[int], list[int]]:
    """The positions of the two parts of a split of ``n`` items (the rule in the module docs).

    Returns:
        ``(first, second)``: disjoint lists of positions in ``range(n)``, each in increasing order.

    Raises:
        DataError: naming ``what``, for fewer than two items, a fraction outside (0, 1), a count
            below 1, a count that leaves no rest, or a ``rest`` below 1.
    """
    if n < 2:
        raise DataError(f"{what} has {n} item(s); cannot split it")
    if rest is not None and rest < 1:
        raise DataError(f"{what}: the second part needs at least one item, got rest={rest}")
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        if size < 1:
            raise DataError(f"{what}: the first part needs at least one item, got size={size}")
        k = int(size)
        if rest is None:
            if k >= n:
                raise DataError(f"{what} has {n} items; keeping {k} in the first part leaves none for the rest "
                                f"(use a count below {n} or a fraction)")
            m = n - k
        elif k + rest > n:
            k = max(1, min(k, n - min(rest, n // 2)))
            m = n - k
        else:
            m = rest
    else:
        k = split_point(n, size, what)
        m = n - k if rest is None else min(rest, n - k)
    order = list(range(n))
    if seed is None:
        return order[:k], order[k:k + m]
    random.Random(seed).shuffle(order)
    return sorted(order[:k]), sorted(order[k:k + m])


class ItemSet:
    """Mixin of the set dataclasses: the one set API (module docs).

    A subclass is a frozen dataclass with fields ``name`` and ``source``, names the field that
    holds its items in ``items_field``, and says what of an item its fingerprint hashes in
    :meth:`item_key`.
    """

    items_field: ClassVar[str]
    name: str
    source: str

    @property
    def items(self) -> tuple:
        """The items, in order."""
        return getattr(self, self.items_field)

    def item_key(self, item) -> Any:
        """The JSON-serialisable content of one item that :meth:`fingerprint` hashes."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator:
        return iter(self.items)

    def fingerprint(self) -> str:
        """A short hash of the items' content (not of the name or source)."""
        return fingerprint([self.item_key(item) for item in self.items])

    def subset(self, indices: Sequence[int], name: str | None = None):
        """The items at ``indices``, in that order, as a set of the same kind (same source)."""
        items = tuple(self.items[i] for i in indices)
        return dataclasses.replace(self, **{"name": name or self.name, self.items_field: items})

    def head(self, n: int | None):
        """The first ``n`` items (all of them when ``n`` is None or at least the set's size)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise DataError(f"cannot keep {n} items of {self.name!r}; give n >= 1 or None for all")
        return self.subset(range(n))

    def split(self, size: float | int, *, seed: int | None = None, rest: int | None = None,
              names: tuple[str | None, str | None] = (None, None)):
        """``(first, rest)`` sets by the one split rule (module docs); ``names`` renames the parts
        (default: both keep the set's name)."""
        first, second = split_indices(len(self), size, seed=seed, rest=rest,
                                      what=f"{type(self).__name__} {self.name!r}")
        return self.subset(first, names[0]), self.subset(second, names[1])

    def halves(self):
        """Two disjoint halves, the even and the odd items (for split-half agreement)."""
        if len(self) < 2:
            raise DataError(f"{type(self).__name__} {self.name!r} has {len(self)} item(s); cannot halve it")
        return (self.subset(range(0, len(self), 2), f"{self.name}[even]"),
                self.subset(range(1, len(self), 2), f"{self.name}[odd]"))
