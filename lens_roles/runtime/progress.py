"""One progress style for every loop a user waits on: a ``tqdm.auto`` bar, off by default.

Every long loop in the package takes ``progress: bool = False`` and opens its bar
with :func:`progress_bar`; with ``progress=False`` the bar is tqdm's own no-op
(``disable=True``), so the loop's code is the same either way.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(enabled: bool, total: int | None, desc: str, unit: str = "prompt") -> tqdm:
    """A ``tqdm.auto`` bar of ``total`` ``unit``\\ s labelled ``desc``; a silent no-op when not ``enabled``.

    Use it as a context manager (``with progress_bar(...) as bar: ... bar.update(n)``)
    so that it is closed however the loop ends.
    """
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)
