"""One exception family for the whole workbench.

Every error the library raises on purpose subclasses :class:`LensRolesError`, so a
notebook can catch them together; the subclasses say which stage complained.
Messages name the file, line, hook, layer or shape involved.
"""

from __future__ import annotations


class LensRolesError(Exception):
    """Base class of every error raised on purpose by ``lens_roles``."""


class UsageError(LensRolesError, ValueError):
    """A command-line argument that cannot work, found before any model loads.

    ``prog`` is the command it belongs to (``"lens-roles psr train"``), so the
    one-line message can say which command complained (None: the one being run).
    """

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class ConfigError(LensRolesError, ValueError):
    """A settings object (``TrainConfig``, ``StudyConfig``, ...) built with a value it cannot use,
    or read from a dict with keys it does not have."""


class DataError(LensRolesError, ValueError):
    """A prompt set, pair file or question file is malformed, empty or mismatched."""


class ModelError(LensRolesError, ValueError):
    """An unknown model name, layer or hook, or a model that cannot be loaded."""


class OutputError(LensRolesError):
    """An output location that cannot be written: a read-only folder, a parent that is a file,
    a folder where a file should go."""


class CacheError(LensRolesError):
    """An on-disk cache entry is corrupt or does not match what was asked for."""


class DirectionError(LensRolesError, ValueError):
    """A direction is malformed or does not fit the model or layer it is used with."""


class PatchingError(LensRolesError, ValueError):
    """A patching request that cannot be answered: unknown grid, a site the metric cannot
    depend on, clean and corrupt runs that do not line up or give the same metric value."""


class PlotError(LensRolesError, ValueError):
    """A figure asked of a frame that holds none of the rows it draws, or with an option it does not have."""


class PSRError(LensRolesError, ValueError):
    """PSR input that cannot work: mismatched runs, a system prompt that changes nothing, a foreign model."""


class SAEError(LensRolesError, ValueError):
    """An SAE that cannot be found or loaded, or that does not fit the model, layer or direction."""


class Cancelled(LensRolesError):
    """A background computation (an explorer's run) was cancelled by the user; raised inside a
    forward pass, so every hook the computation attached is removed on the way out."""
