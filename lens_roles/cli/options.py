"""What every ``lens-roles`` command shares: options, argument checks, model loading.

Arguments are checked in two rounds, both before any model loads:

1. while parsing, by the ``type=`` of each option (numbers, ranges, layer syntax,
   α lists): a bad value is an ``argparse`` error that names the option;
2. right after parsing, by :func:`check_paths`: input files and folders exist,
   output locations can be written (by really creating and removing a file
   there: the sessions run as root, for whom permission bits say little).

Only what needs the model waits for it: a layer beyond the model's depth
(:meth:`LayerSpec.resolve`), a vector from another model (:func:`check_model_match`).
Every failure is one line, ``lens-roles <command>: error: …``, exit code 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from lens_roles.errors import DataError, DirectionError, ModelError, OutputError, UsageError
from lens_roles.inputs.prompts import PairSet, PromptSet, load_pairs, load_prompt_set, shipped_or_path
from lens_roles.io import check_writable
from lens_roles.runtime.models import validate_layers

#: ``--dtype`` names and the weight dtypes they load.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: ``--batch-size`` default per kind of work; each command documents which kind it does.
BATCH_SIZES = {
    # prompts per forward pass that only reads activations, logits or gradients
    "read": 16,
    # prompts per batch of steered generation, and per Adam step of PSR training
    # (there the batch size is a training setting: it changes the result)
    "generate": 4,
    # patched runs per forward pass (each is one prompt with one cell patched)
    "patch": 32,
}

#: A model loader: ``load_model(name, *, device, dtype) -> HookedTransformer``.
ModelLoader = Callable[..., object]

#: Options whose value is a comma-separated number list and may start with "-".
NUMBER_LIST_OPTIONS = frozenset({"--alphas", "--multipliers", "--layers", "--layer", "--select-layers", "--cap"})
_NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :class:`UsageError` (one line, no usage block).

    ``main`` prints them as ``<prog>: error: <message>`` and returns 2, so tests
    see the exit code without catching ``SystemExit``.
    """

    def error(self, message: str):
        raise UsageError(message, prog=self.prog)


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """Write ``--alphas -0.5,0.5`` as ``--alphas=-0.5,0.5`` so argparse reads it as a value.

    argparse (before Python 3.13) takes any word that starts with "-" and is not a
    single number for an option; a number list such as ``-0.5,0.5`` is one.
    Only the options in :data:`NUMBER_LIST_OPTIONS` are joined.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in NUMBER_LIST_OPTIONS and i + 1 < len(argv) and _NEGATIVE_VALUE.match(argv[i + 1]):
            out.append(f"{word}={argv[i + 1]}")
            i += 2
        else:
            out.append(word)
            i += 1
    return out


# --------------------------------------------------------------------------- commands


def add_command(sub, name: str, handler: Callable, *, help: str) -> CommandParser:
    """A subcommand parser whose ``args.handler`` is ``handler(args, load_model) -> int``.

    ``args.prog`` is the command's name for error messages (``lens-roles psr train``).
    """
    parser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=handler, prog=parser.prog, input_paths=(), output_paths=())
    return parser


@dataclass(frozen=True)
class PathOption:
    """A path option that :func:`check_paths` checks after parsing.

    ``dest`` is its name in the namespace, ``flag`` its name on the command line;
    ``kind`` is ``"file"``, ``"folder"`` or (inputs only) ``"path"`` (either);
    ``suffix`` is the ending an output file must have (``".safetensors"``).
    """

    dest: str
    flag: str
    kind: str
    suffix: str = ""


def _declare(parser: argparse.ArgumentParser, role: str, option: PathOption) -> None:
    parser.set_defaults(**{role: (*parser.get_default(role), option)})


def add_input(parser: argparse.ArgumentParser, flag: str, *, kind: str = "file", **kw) -> None:
    """An option naming input that must exist (a ``kind``) before any model loads.

    With ``nargs`` every value is checked. :func:`check_paths` does the check after parsing.
    """
    action = parser.add_argument(flag, **kw)
    _declare(parser, "input_paths", PathOption(action.dest, flag, kind))


def add_output(parser: argparse.ArgumentParser, flag: str, *, kind: str = "folder", suffix: str = "", **kw) -> None:
    """An option naming where results go: a ``"folder"``, or a ``"file"`` ending in ``suffix``.

    :func:`check_paths` makes sure something can be written there before any model loads.
    """
    action = parser.add_argument(flag, **kw)
    _declare(parser, "output_paths", PathOption(action.dest, flag, kind, suffix))


def add_model_options(parser: argparse.ArgumentParser, *, batch: str | None = "read") -> None:
    """``--model``, ``--device``, ``--dtype`` and (unless ``batch`` is None) ``--batch-size``.

    ``batch`` names the kind of work in :data:`BATCH_SIZES`, which sets the default.
    """
    parser.add_argument(
        "--model",
        default=None,
        help="embedded name, local Hugging Face folder or TransformerLens name (default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (default: float32)")
    if batch is not None:
        work = {
            "read": "prompts per forward pass",
            "generate": "prompts per batch (of generation, or of each training step)",
            "patch": "patched runs per forward pass",
        }[batch]
        parser.add_argument(
            "--batch-size",
            type=int_at_least("--batch-size", 1),
            default=BATCH_SIZES[batch],
            help=f"{work} (default: {BATCH_SIZES[batch]})",
        )


def add_collect_options(parser: argparse.ArgumentParser, *, positions: Sequence[str] = (),
                        layers: bool = True) -> None:
    """The options of commands that read activations of prompt sets: layers, positions, cache, template.

    ``positions`` are the ``--positions`` choices, the first being the default
    (none: the command has fixed positions and no such option); ``layers=False``
    leaves out ``--layers`` (the command reads every layer).
    """
    if layers:
        parser.add_argument(
            "--layers", type=layer_spec("--layers"), default="all", help="all, 5, 3,7 or 10-20 (default: all)"
        )
    if positions:
        parser.add_argument("--positions", default=positions[0], choices=list(positions),
                            help=f"token positions averaged (default: {positions[0]})")
    add_output(parser, "--cache-dir", default=None, help="activation cache folder (default: none)")
    add_template_option(parser)


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``, ``--workers N``, ``--gpus-per-worker G``: run the forward passes on a Ray cluster.

    ``--ray`` alone starts a local Ray instance; ``--ray auto`` joins the cluster
    started on this machine with ``ray start``; ``--ray host:port`` (or
    ``ray://host:port``) joins a remote one. See :func:`ray_executor`.
    """
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS", type=ray_address,
                        help="run on Ray workers: alone a local Ray instance, or a cluster address "
                             "(auto, host:port, ray://host:port); needs the [distributed] extra")
    parser.add_argument("--workers", type=int_at_least("--workers", 1), default=2,
                        help="Ray workers, each holding the model (default: 2; only with --ray)")
    parser.add_argument("--gpus-per-worker", type=finite_float("--gpus-per-worker", minimum=0.0), default=0.0,
                        help="GPUs per Ray worker (default: 0; with --device cuda use 1, or more "
                             "to split a large model over them)")


def ray_address(text: str) -> str:
    """A ``--ray`` address that something listens at (checked within 5 s, before any model loads)."""
    from lens_roles.distributed import check_address

    try:
        check_address(text)
    except UsageError as exc:
        _fail(str(exc))
    return text


@contextmanager
def ray_executor(args: argparse.Namespace):
    """The :class:`~lens_roles.distributed.RayExecutor` ``--ray`` asks for (closed on exit), or None.

    Its workers load ``--model`` on ``--device`` in ``--dtype``, with
    ``n_devices = --gpus-per-worker`` when that is a whole number above 1.
    """
    if getattr(args, "ray", None) is None:
        yield None
        return
    from lens_roles.distributed import RayExecutor

    gpus = args.gpus_per_worker
    n_devices = int(gpus) if gpus > 1 and float(gpus).is_integer() else 1
    with RayExecutor(args.model, device=args.device, dtype=DTYPES[args.dtype], n_devices=n_devices,
                     workers=args.workers, gpus_per_worker=gpus,
                     address=None if args.ray == "local" else args.ray) as executor:
        print(f"Ray: {args.workers} worker(s) hold {executor.info['model']} on {executor.info['device']}",
              file=sys.stderr)
        yield executor


def add_template_option(parser: argparse.ArgumentParser) -> None:
    """``--template chat|plain``: how prompts are rendered (default: the model's own chat template if any)."""
    parser.add_argument(
        "--template",
        choices=["chat", "plain"],
        default=None,
        help="chat template (default: the model's own if it has one, else plain)",
    )


def collect_kw(args: argparse.Namespace) -> dict:
    """The activation-collection keywords (``batch_size``, ``cache_dir``, ``template``, ``progress``)
    of a command with :func:`add_model_options` and ``--cache-dir``/``--template``."""
    return dict(batch_size=args.batch_size, cache_dir=args.cache_dir, template=args.template, progress=True)


# --------------------------------------------------------------------------- value types


def _fail(message: str):
    raise argparse.ArgumentTypeError(message)


def int_at_least(option: str, minimum: int, *, note: str = "") -> Callable[[str], int]:
    """``type=`` for an integer option that must be ``>= minimum`` (``note`` says what 0 means)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            _fail(f"cannot read {option} {text!r}: need a whole number >= {minimum}")
        if value < minimum:
            _fail(f"need {option} >= {minimum}{note}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def finite_float(option: str, *, minimum: float | None = None, above: float | None = None) -> Callable[[str], float]:
    """``type=`` for a finite number, optionally ``>= minimum`` or ``> above``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            _fail(f"cannot read {option} {text!r}: need a number")
        if not math.isfinite(value):
            _fail(f"{option} must be finite, got {text!r}")
        if minimum is not None and value < minimum:
            _fail(f"need {option} >= {minimum:g}, got {value:g}")
        if above is not None and not value > above:
            _fail(f"need {option} > {above:g}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def device_name(text: str) -> str:
    """``type=`` for ``--device``: a name torch knows, and a CUDA device only where torch sees one."""
    try:
        device = torch.device(text)
    except RuntimeError:
        _fail(f"unknown --device {text!r}: use cpu, cuda, cuda:1, ...")
    if device.type == "cuda" and not torch.cuda.is_available():
        _fail(f"--device {text} asked for, but torch sees no CUDA device here; use --device cpu")
    return text


def fraction(option: str) -> Callable[[str], float]:
    """``type=`` for a fraction strictly between 0 and 1 (a split point)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            _fail(f"cannot read {option} {text!r}: need a number in (0, 1)")
        if not 0 < value < 1:
            _fail(f"{option} must be in (0, 1), got {text!r}")
        return value

    parse.__name__ = "fraction"
    return parse


def number_list(option: str, what: str) -> Callable[[str], list[float]]:
    """``type=`` for a comma-separated list of finite numbers (``what`` names them in messages)."""

    def parse(text: str) -> list[float]:
        try:
            values = [float(a) for a in text.split(",") if a.strip()]
        except ValueError:
            _fail(f"cannot read {option} {text!r}: use comma-separated numbers, e.g. {option}=-0.5,0.5")
        if not values:
            _fail(f"{option} {text!r} names no value: use comma-separated numbers, e.g. {option}=-0.5,0.5")
        if not all(math.isfinite(v) for v in values):
            _fail(f"{what} values must be finite, got {option} {text!r}")
        return values

    parse.__name__ = "number list"
    return parse


@dataclass(frozen=True)
class LayerSpec:
    """A parsed layer option: ``all``, or inclusive ``(low, high)`` ranges.

    The ranges stay ranges until the model's depth is known, so a spec such as
    ``0-1000000000000`` is a one-line error in :meth:`resolve`, not a huge list.
    """

    option: str
    text: str
    ranges: tuple[tuple[int, int], ...]  # empty: every layer

    @property
    def is_all(self) -> bool:
        return not self.ranges

    def resolve(self, model) -> tuple[int, ...]:
        """The sorted block indices of ``model`` (negative ones count from the end).

        Raises:
            ModelError: a layer beyond the model's depth (names the option, the
                model and its depth).
        """
        n_layers = model.cfg.n_layers
        if self.is_all:
            return tuple(range(n_layers))
        for low, high in self.ranges:
            for bad in (low, high):
                if not -n_layers <= bad < n_layers:
                    raise ModelError(
                        f"layer {bad} is out of range for {model.cfg.model_name} with {n_layers} layers "
                        f"(0..{n_layers - 1}); fix {self.option} {self.text}"
                    )
        return validate_layers(model, [layer for low, high in self.ranges for layer in range(low, high + 1)])


_SINGLE = re.compile(r"^-?\d+$")
_RANGE = re.compile(r"^(\d+)-(\d+)$")


def layer_spec(option: str, *, allow_all: bool = True, why_not_all: str = "") -> Callable[[str], LayerSpec]:
    """``type=`` for ``all``, ``5``, ``-1``, ``3,7`` or ``10-20`` (inclusive, low <= high)."""

    def parse(text: str) -> LayerSpec:
        spec = text.strip()
        if spec == "all":
            if not allow_all:
                _fail(f"{option} all {why_not_all}".rstrip())
            return LayerSpec(option, spec, ())
        ranges = []
        examples = f"{'all, ' if allow_all else ''}5, 3,7 or 10-20"
        for part in (p.replace(" ", "") for p in spec.split(",")):
            where = f" at {part!r}" if part != spec else ""
            if _SINGLE.match(part):
                ranges.append((int(part), int(part)))
            elif not (m := _RANGE.match(part)):
                _fail(f"cannot read {option} {text!r}{where}: use e.g. {examples}")
            elif int(m[1]) > int(m[2]):
                _fail(f"{option} {text!r}: the range {part} runs backwards; write {m[2]}-{m[1]} (low-high)")
            else:
                ranges.append((int(m[1]), int(m[2])))
        return LayerSpec(option, spec, tuple(ranges))

    parse.__name__ = "layer spec"
    return parse


# --------------------------------------------------------------------------- paths


def check_input(path: str | Path, option: str, kind: str = "file") -> Path:
    """Raise a one-line :class:`UsageError` unless ``path`` is an existing file/folder.

    A bare name that is no file (``librarian``, ``chemist``, ``baseline``) stands for the
    shipped set of that name (:func:`~lens_roles.inputs.prompts.shipped_or_path`).
    """
    path = Path(path)
    if kind == "file":
        for folder in ("personas", "roles"):
            path = shipped_or_path(path, folder)
    if not path.exists():
        raise UsageError(f"{option} {path}: no such {'file or folder' if kind == 'path' else kind}")
    if kind == "file" and not path.is_file():
        raise UsageError(f"{option} {path}: is a folder, not a file")
    if kind == "folder" and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, not a folder")
    return path


def check_output(path: str | Path, option: str, kind: str = "folder", suffix: str = "") -> Path:
    """Raise a one-line :class:`UsageError` unless results can be written at ``path``.

    ``kind`` is ``"folder"`` or ``"file"`` (which must end in ``suffix``). Nothing is
    created: the check writes and removes a temporary file in the deepest folder
    that exists on the way to ``path``, because permission bits do not tell
    whether root can write there.
    """
    path = Path(path)
    want_folder = kind == "folder"
    if suffix and path.suffix != suffix:
        raise UsageError(f"{option} must end in {suffix}, got {path}")
    if path.exists() and path.is_dir() != want_folder:
        raise UsageError(f"{option} {path}: is a {'file' if want_folder else 'folder'}, not a {kind}")
    try:
        check_writable(path, option)
    except OutputError as exc:
        raise UsageError(f"{exc}; choose another location") from None
    return path


def check_paths(args: argparse.Namespace) -> None:
    """Check every input and output path the command declared (see :func:`add_input`, :func:`add_output`)."""
    for option in args.input_paths:
        value = getattr(args, option.dest)
        for path in value if isinstance(value, list) else [value]:
            if path is not None:
                check_input(path, option.flag, option.kind)
    for option in args.output_paths:
        if getattr(args, option.dest) is not None:
            check_output(getattr(args, option.dest), option.flag, option.kind, option.suffix)


# --------------------------------------------------------------------------- loading


def open_model(args: argparse.Namespace, load_model: ModelLoader):
    """Load ``args.model`` on ``args.device`` in ``args.dtype`` with ``load_model``; say so on stderr.

    With ``--ray`` the driver's copy only tokenizes, checks shapes and reads out the workers' final
    residuals (multiple choice), so it is loaded on the CPU (``--device`` is where the workers load theirs).
    """
    t0 = time.perf_counter()
    device = "cpu" if getattr(args, "ray", None) is not None else args.device
    model = load_model(args.model, device=device, dtype=DTYPES[args.dtype])
    print(
        f"loaded {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}) "
        f"in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return model


def check_model_match(direction, model) -> None:
    """Raise :class:`DirectionError` when ``direction`` was extracted from another model."""
    if direction.meta.get("model") not in (None, model.cfg.model_name):
        raise DirectionError(
            f"the vector was extracted from {direction.meta.get('model')!r}, but the model is "
            f"{model.cfg.model_name!r}; pass --model {direction.meta.get('model')}"
        )


def load_pairs_or_prompts(path: str | Path) -> PairSet | PromptSet:
    """Contrast pairs if ``path`` holds them, else a prompt set (e.g. a role's instructions).

    A file that is neither raises the prompt-set loader's :class:`DataError`.
    """
    try:
        return load_pairs(path)
    except DataError:
        return load_prompt_set(path)


def head(items: Iterable, n: int) -> list:
    """The first ``n`` items, or all of them when ``n`` is 0 (the CLI's "0: all")."""
    return list(items)[:n] if n else list(items)
