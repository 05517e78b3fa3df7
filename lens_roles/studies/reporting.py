"""How a study reports a line of results while it runs (beside its tqdm bars): printed when ``progress``."""

from __future__ import annotations


def report(progress: bool, message: str) -> None:
    """Print ``message`` (a result line: a grid's strongest cell, an SAE's quality) when ``progress`` is on."""
    if progress:
        print(message)
