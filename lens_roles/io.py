"""Reading and writing files so that bad input gives one clear error and no half-written file stays.

Reading (:func:`read_text`, :func:`parse_json`, :func:`parse_jsonl`): every file the
workbench reads as text goes through here, so that a missing path, a folder, a FIFO,
an unreadable file, a file that is not UTF-8, one that is too large, JSON that nests
too deep, a number with thousands of digits or a string holding a lone surrogate all
become one :class:`~lens_roles.errors.DataError` naming the file (and the line).

Binary vector files of other tools (:func:`regular_file`, :func:`read_bytes`): the same checks
(a regular file, not too large) before ``torch.load``, ``numpy.load`` or the GGUF reader see them.

Plain data (:func:`to_plain`): the one converter of frozen values (a direction's meta,
a config) to JSON-serialisable dicts and lists.

Writing (:func:`atomic_write`, :func:`write_csv`, :func:`save_tensors`): each output
is written to a temporary file beside its target and renamed into place, so an
interrupted or failing write never leaves a partial file; a tensor file and its JSON
sidecar appear together or not at all. An output location that cannot be written is
an :class:`~lens_roles.errors.OutputError` naming it; :func:`check_writable` asks
before any expensive work.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.torch import save_file

from lens_roles.errors import DataError, OutputError

#: largest text file read (bytes); prompt and question sets are far smaller
MAX_TEXT_BYTES = 256 * 1024 * 1024
#: deepest nesting of JSON arrays/objects accepted (records are a few levels deep)
MAX_JSON_DEPTH = 64
#: significant digits of the floats written to tables, figure data and figure metadata. A float32
#: result carries about seven, and the seventh changes with the order of a summation (thread
#: count, batch shapes); six keep a rerun's files identical to the last one's in all but rare cases
SIGNIFICANT_DIGITS = 6


# ------------------------------------------------------------------------ reading


def read_text(path: str | Path, what: str = "file", *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path`` (a leading BOM is dropped).

    Raises:
        DataError: naming ``path``, when it does not exist, is a folder or another
            non-regular file (FIFO, device), cannot be read, is larger than
            ``max_bytes``, or is not valid UTF-8 (e.g. UTF-16 or Latin-1 text).
    """
    path = regular_file(path, what, DataError, max_bytes=max_bytes)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read this {what} ({exc.strerror or exc})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text; save it as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start}); "
                        "save the file as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def _check_json_value(value, where: str, depth: int = 0) -> None:
    """Reject nesting deeper than :data:`MAX_JSON_DEPTH` and strings with lone surrogates."""
    if depth > MAX_JSON_DEPTH:
        raise DataError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: a string holds a lone surrogate (\\ud800-\\udfff escape), "
                            "which is not text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_json_value(k, where, depth + 1)
            _check_json_value(v, where, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json_value(v, where, depth + 1)


def parse_json(text: str, where: str):
    """``json.loads(text)``, with every way it can fail as a :class:`DataError` naming ``where``.

    Rejects invalid JSON, integers too long to convert, nesting deeper than
    :data:`MAX_JSON_DEPTH` and strings with lone surrogates. ``NaN`` literals are read
    as Python does (upstream question files use them for empty option slots); the
    loaders check each field's value.
    """
    return _loads(text, where, lambda exc: f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")


def parse_jsonl(text: str, where: str) -> list[tuple[int, object]]:
    """``(line number, value)`` for each non-blank line of JSON Lines text (errors name ``where:line``).

    Lines are split on ``\\n`` only (``\\r\\n`` works too): U+2028, U+2029 and U+0085
    are ordinary characters inside JSON strings, not line ends.
    """
    out = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            out.append((lineno, _loads(line, f"{where}:{lineno}",
                                       lambda exc: f"malformed JSON ({exc.msg} at column {exc.colno})")))
    return out


def _loads(text: str, where: str, syntax: Callable[[json.JSONDecodeError], str]):
    """:func:`json.loads` for :func:`parse_json` and :func:`parse_jsonl`; ``syntax`` words a syntax error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: {syntax(exc)}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise DataError(f"{where}: unreadable JSON value ({exc})") from None
    _check_json_value(value, where)
    return value


def read_tensors(path: str | Path, what: str, error: type[Exception], *, required: tuple[str, ...] = ()
                 ) -> tuple[dict, dict]:
    """``(tensors, info)`` of a safetensors file written by :func:`save_tensors`.

    ``info`` is the JSON object under the metadata key ``meta`` (``{}`` when there
    is none). Every failure — a missing or non-regular file, a damaged file, metadata
    that is not a JSON object, a missing ``required`` tensor — raises ``error``
    naming ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}" if not path.exists() else f"{path} is not a {what} (not a regular file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("meta", "{}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged or unreadable files
        raise error(f"{path} is not a readable {what} ({type(exc).__name__}: {exc})") from None
    try:
        info = parse_json(raw, f"{path} (metadata)")
    except DataError as exc:
        raise error(str(exc)) from None
    if not isinstance(info, dict):
        raise error(f"{path}: its metadata is a JSON {type(info).__name__}, not an object; it was not written "
                    "by lens_roles")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise error(f"{path}: no tensor {', '.join(map(repr, missing))} in this {what} (it has {sorted(tensors)})")
    return tensors, info


#: largest binary vector file read (bytes): a vector file of the largest open models is a few hundred MB
MAX_BINARY_BYTES = 2 * 1024 * 1024 * 1024


def regular_file(path: str | Path, what: str, error: type[Exception], *, max_bytes: int = MAX_BINARY_BYTES) -> Path:
    """``path`` when it is an existing regular file of at most ``max_bytes``, for readers that open it themselves
    (the ``gguf`` package's memory map).

    Raises:
        error: naming ``path``, when it is missing, a folder, a FIFO or device, or too large.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read this {what} ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path} is a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path} is not a regular file (a FIFO, socket or device?); give a {what}")
    if info.st_size > max_bytes:
        raise error(f"{path} is {info.st_size} bytes, more than the {max_bytes} a {what} may have")
    return path


def read_bytes(path: str | Path, what: str, error: type[Exception], *, max_bytes: int = MAX_BINARY_BYTES) -> bytes:
    """The bytes of ``path`` (checked by :func:`regular_file`), for binary formats parsed from memory
    (``torch.load``, ``numpy.load``).

    Raises:
        error: naming ``path`` (see :func:`regular_file`), or when it cannot be read.
    """
    path = regular_file(path, what, error, max_bytes=max_bytes)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read this {what} ({exc.strerror or exc})") from None


# ------------------------------------------------------------------------ writing


def to_plain(value: Any) -> Any:
    """Plain JSON-serialisable data: every mapping (also a read-only ``MappingProxyType``) as a
    ``dict``, every tuple as a ``list``, recursively; anything else unchanged.

    The one converter used wherever frozen values (a direction's meta, a config) are written out.
    """
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    return value


def _existing_ancestor(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Check that ``path`` (a file or folder still to be written) can be created, before any work.

    The deepest existing ancestor must be a folder in which a file can really be
    created: one is created and removed there, because permission bits do not stop
    root while a read-only file system does, and ``os.access`` cannot tell.

    Raises:
        OutputError: naming ``path`` and why it cannot be written.
    """
    path = Path(path)
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise OutputError(f"cannot write the {what} {path}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lens-roles-probe-", dir=base)
    except OSError as exc:
        raise OutputError(f"cannot write the {what} {path}: {base} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _replace(tmp: str, path: Path) -> None:
    if path.is_dir():
        raise OutputError(f"cannot write {path}: a folder of that name is in the way")
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc})") from None


def _temp_beside(path: Path) -> str:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc} ({_existing_ancestor(path.parent)})") from None
    os.close(fd)
    return tmp


def _write_temp(path: Path, write: Callable[[str], None]) -> str:
    """Call ``write(tmp)`` on a temporary file beside ``path``; the temporary file's name."""
    tmp = _temp_beside(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
    except BaseException as exc:
        os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"cannot write {path} ({exc.strerror or exc})") from None
        raise
    return tmp


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The temporary file is removed if ``write`` raises; the folder is created if needed.

    Raises:
        OutputError: the folder cannot be created or written, or ``path`` is a folder.
    """
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        _replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_all(writes: Mapping[Path, Callable[[str], None]]) -> list[Path]:
    """Write several files as one unit: all appear, or none is changed.

    Every file is first written to a temporary file; only when all succeeded are
    they renamed into place. If a rename fails, the files already renamed are
    removed again, so a failure never leaves one without the others.
    """
    temps: dict[Path, str] = {}
    try:
        for path, write in writes.items():
            temps[Path(path)] = _write_temp(Path(path), write)
        done: list[Path] = []
        try:
            for path, tmp in temps.items():
                _replace(tmp, path)
                done.append(path)
        except BaseException:
            for path in done:
                path.unlink(missing_ok=True)
            raise
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return list(temps)


def write_csv(frame, path: str | Path, *, significant: int | None = SIGNIFICANT_DIGITS) -> Path:
    """``frame.to_csv(path, index=False)``, atomically, float columns to ``significant`` digits.

    ``significant=None`` writes every float in full (``repr``) precision.
    """
    float_format = None if significant is None else f"%.{significant}g"
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, float_format=float_format))


def round_significant(value, significant: int = SIGNIFICANT_DIGITS):
    """``value`` with every float in it rounded to ``significant`` significant digits.

    Walks dicts, lists and tuples (a tuple becomes a list, as JSON would write it);
    a floating-point numpy array of any shape comes back as a float64 array of the
    rounded values; everything else (ints, bools, strings, other arrays) as it is.
    Figures and their metadata go through it before they are written, so that their
    files depend on the values to the precision they carry and not on float noise.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (float, np.floating)):
        x = float(value)
        return float(f"{x:.{significant}g}") if x == x and abs(x) != float("inf") else x
    if isinstance(value, dict):
        return {k: round_significant(v, significant) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_significant(v, significant) for v in value]
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        flat = [round_significant(float(x), significant) for x in value.ravel()]
        return np.array(flat, dtype=np.float64).reshape(value.shape)
    return value


def save_tensors(path: str | Path, tensors: Mapping, info: dict) -> Path:
    """Write ``tensors`` as safetensors (``info`` as JSON metadata key ``meta``) and ``info`` as a
    JSON sidecar beside it (``path`` with suffix ``.json``), the two as one unit."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = json.dumps(info, default=str)
    atomic_write_all({
        path: lambda tmp: save_file(tensors, tmp, metadata={"meta": meta}),
        path.with_suffix(".json"): lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2, default=str)),
    })
    return path
