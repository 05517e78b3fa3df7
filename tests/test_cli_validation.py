"""Every ``lens-roles`` argument that can be checked without a model is checked before one loads.

Each bad argument gives exit code 2 and exactly one line on stderr,
``lens-roles <command>: error: …``, naming the option and the value; the model
loader passed to ``main`` raises if it is called, so a passing test proves that
no model was loaded. Read-only locations are paths under ``/proc`` (root can
write where ``chmod 555`` forbids it, but not there) and paths below a regular file.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from lens_roles.cli import build_parser, main
from lens_roles.cli.options import check_output, join_negative_values
from lens_roles.inputs.prompts import data_dir

READ_ONLY = "/proc/lens-roles-no-such-dir"


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the model loader was called, but the arguments were bad")


@pytest.fixture
def files(tmp_path):
    """Placeholder inputs: the checks look at paths only, so their contents never matter."""
    for name in ("v.safetensors", "pairs.jsonl", "psr.safetensors", "baseline.jsonl", "domains.json", "corpus.json"):
        (tmp_path / name).write_text("")
    (tmp_path / "questions").mkdir()
    (tmp_path / "roles").mkdir()
    return tmp_path


def commands(d) -> dict[str, list[str]]:
    """A valid argument list per command (``d``: the folder of :func:`files`); outputs go to ``d/out``."""
    v, pairs, out = str(d / "v.safetensors"), str(d / "pairs.jsonl"), str(d / "out")
    return {
        "extract": ["extract", "--pairs", pairs, "--out", str(d / "out" / "v.safetensors")],
        "roles": ["roles", "--out", out],
        "demo": ["demo", "--out", out, "--directions-out", str(d / "dirs")],
        "sweep": ["sweep", "--vector", v, "--pairs", pairs, "--out", out],
        "generate": ["generate", "--vector", v, "--layer", "1", "--alpha", "0.5", "Hello"],
        "evaluate": ["evaluate", "--questions", str(d / "questions"), "--out", out],
        "ab-curve": ["ab-curve", "--pairs", pairs, "--layer", "1", "--out", out],
        "patch": ["patch", "--clean", "a", "--corrupt", "b", "--metric", "logit_diff", "--good", "x", "--bad", "y",
                  "--out", out],
        "psr train": ["psr", "train", "--vector", v, "--system-prompt", "You are a librarian.", "--prompts", pairs,
                      "--out", out],
        "psr compare": ["psr", "compare", "--vector", v, "--psr", str(d / "psr.safetensors"), "--pairs", pairs,
                        "--out", out],
        "train-sae": ["train-sae", "--layer", "1", "--out", out],
        "sae-align": ["sae-align", "--vector", v, "--sae", str(d / "sae"), "--out", out],
        "sae-attribute": ["sae-attribute", "--vector", v, "--sae", str(d / "sae"), "--prompts", pairs,
                          "--out", out],
    }


def with_value(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option`` set to ``value`` (replaced where present, else added before positionals)."""
    if option in argv:
        i = argv.index(option)
        return [*argv[: i + 1], value, *argv[i + 2:]]
    if argv[0] == "generate":
        return [*argv[:-1], option, value, argv[-1]]
    return [*argv, option, value]


def one_error(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"lens-roles {command}: error: "), lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def check_rejected(files, capsys, command: str, option: str, value: str, *, names: str | None = None) -> str:
    argv = with_value(commands(files)[command], option, value)
    assert main(argv, load_model=refuse_to_load) == 2
    line = one_error(capsys, command)
    assert option in line and (names or value) in line, line
    assert not (files / "out").exists()
    return line


BATCH_SIZE = ["extract", "roles", "demo", "sweep", "evaluate", "ab-curve", "patch", "psr train", "train-sae",
              "sae-align", "sae-attribute"]
LAYER_SPECS = [("extract", "--layers"), ("roles", "--layers"), ("demo", "--layers"), ("sweep", "--layers"),
               ("patch", "--layers"), ("train-sae", "--layer"), ("evaluate", "--select-layers")]
NUMBER_LISTS = [("sweep", "--alphas"), ("evaluate", "--alphas"), ("ab-curve", "--multipliers"),
                ("generate", "--alpha"), ("psr train", "--alpha")]
OUTPUTS = [
    ("extract", "--out"), ("roles", "--out"), ("demo", "--out"), ("demo", "--directions-out"), ("sweep", "--out"),
    ("evaluate", "--out"), ("ab-curve", "--out"), ("patch", "--out"), ("psr train", "--out"),
    ("psr compare", "--out"), ("train-sae", "--out"), ("sae-align", "--out"), ("sae-attribute", "--out"),
    ("extract", "--cache-dir"), ("roles", "--cache-dir"), ("demo", "--cache-dir"), ("evaluate", "--cache-dir"),
]
INPUTS = [("extract", "--pairs"), ("roles", "--baseline"), ("roles", "--roles-dir"), ("sweep", "--vector"),
          ("sweep", "--pairs"), ("generate", "--vector"), ("evaluate", "--questions"), ("evaluate", "--baseline"),
          ("evaluate", "--role-domains"), ("ab-curve", "--pairs"), ("patch", "--vector"), ("psr train", "--vector"),
          ("psr train", "--prompts"), ("psr compare", "--vector"), ("psr compare", "--psr"),
          ("psr compare", "--pairs"), ("psr compare", "--questions"), ("sae-align", "--vector"),
          ("sae-align", "--corpus"), ("sae-align", "--roles"), ("sae-attribute", "--vector"),
          ("sae-attribute", "--prompts")]


@pytest.mark.parametrize("command", BATCH_SIZE)
def test_batch_size_zero(files, capsys, command):
    check_rejected(files, capsys, command, "--batch-size", "0")


DEVICES = ["extract", "roles", "demo", "sweep", "generate", "evaluate", "ab-curve", "patch", "psr train",
           "psr compare", "train-sae", "sae-align", "sae-attribute"]


@pytest.mark.parametrize("command", DEVICES)
def test_unknown_device(files, capsys, command):
    check_rejected(files, capsys, command, "--device", "gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a CUDA device here")
def test_cuda_without_cuda(files, capsys):
    check_rejected(files, capsys, "extract", "--device", "cuda")


def test_epochs_zero(files, capsys):
    check_rejected(files, capsys, "psr train", "--epochs", "0")


@pytest.mark.parametrize("command, option", LAYER_SPECS)
@pytest.mark.parametrize("spec", ["3-1", "abc", "1-"])
def test_bad_layer_syntax(files, capsys, command, option, spec):
    check_rejected(files, capsys, command, option, spec)


@pytest.mark.parametrize("command, option", NUMBER_LISTS)
@pytest.mark.parametrize("value", ["nan", "0.5,inf", "one"])
def test_non_finite_or_unreadable_alphas(files, capsys, command, option, value):
    check_rejected(files, capsys, command, option, value)


@pytest.mark.parametrize("command, option, value", [
    ("sweep", "--eval-fraction", "1"), ("psr compare", "--eval-fraction", "0"), ("train-sae", "--eval-fraction", "2"),
    ("psr train", "--train-fraction", "0"), ("evaluate", "--validation", "1.5"), ("psr train", "--lr", "0"),
    ("psr train", "--lr", "nan"), ("train-sae", "--lr", "-1"), ("train-sae", "--l1", "0"), ("train-sae", "--k", "0"),
    ("train-sae", "--tokens", "0"), ("train-sae", "--d-sae", "0"), ("generate", "--temperature", "-1"),
    ("generate", "--max-new-tokens", "0"), ("sweep", "--generate", "-1"), ("psr compare", "--steps", "0"),
    ("psr compare", "--max-new-tokens", "1"), ("psr compare", "--target-perplexity", "1"),
    ("ab-curve", "--n-train", "0"), ("ab-curve", "--n-test", "0"), ("evaluate", "--max-test", "-1"),
    ("evaluate", "--n-boot", "10"), ("sae-align", "--top", "0"), ("sae-align", "--decompose", "0"),
    ("sae-attribute", "--check", "-1"), ("sae-attribute", "--max-prompts", "-1"), ("psr train", "--max-prompts", "x"),
])
def test_numbers_out_of_range(files, capsys, command, option, value):
    check_rejected(files, capsys, command, option, value)


def test_config_checks_run_before_loading(files, capsys):
    """What the config dataclasses reject (here a TopK k not below d_sae) is one line before any model loads."""
    argv = commands(files)["train-sae"] + ["--d-sae", "8", "--k", "8"]
    assert main(argv, load_model=refuse_to_load) == 2
    assert "k must be in 1..d_sae-1" in one_error(capsys, "train-sae")


@pytest.mark.parametrize("command, option", OUTPUTS)
def test_output_in_a_read_only_location(files, capsys, command, option):
    target = f"{READ_ONLY}/v.safetensors" if (command, option) == ("extract", "--out") else f"{READ_ONLY}/out"
    line = check_rejected(files, capsys, command, option, target)
    assert "cannot write" in line


@pytest.mark.parametrize("command, option", OUTPUTS)
def test_output_below_a_regular_file(files, capsys, command, option):
    blocker = files / "pairs.jsonl"
    name = "v.safetensors" if (command, option) == ("extract", "--out") else "out"
    line = check_rejected(files, capsys, command, option, str(blocker / "sub" / name))
    assert f"{blocker} is a file" in line


@pytest.mark.parametrize("command, option", INPUTS)
def test_missing_input(files, capsys, command, option):
    line = check_rejected(files, capsys, command, option, str(files / "missing" / "nothing.json"))
    assert "no such" in line


def test_an_input_file_that_is_a_folder(files, capsys):
    line = check_rejected(files, capsys, "extract", "--pairs", str(files / "questions"))
    assert "is a folder, not a file" in line


def test_extract_out_must_be_safetensors(files, capsys):
    check_rejected(files, capsys, "extract", "--out", str(files / "v.pt"))


def test_unknown_command_and_missing_option_are_one_line(files, capsys):
    assert main(["bogus"], load_model=refuse_to_load) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert main(["extract", "--pairs", str(files / "pairs.jsonl")], load_model=refuse_to_load) == 2
    assert "--out" in one_error(capsys, "extract")
    assert main([*commands(files)["sweep"], "--bogus", "1"], load_model=refuse_to_load) == 2
    assert "unrecognized arguments: --bogus 1" in one_error(capsys, "sweep")


def test_the_output_check_leaves_nothing_behind(tmp_path):
    check_output(tmp_path / "a" / "b", "--out")
    check_output(tmp_path / "v.safetensors", "--out", "file", ".safetensors")
    assert list(tmp_path.iterdir()) == []


def test_negative_number_lists_need_no_equals_sign(files):
    parser = build_parser()
    sweep = parser.parse_args(join_negative_values(commands(files)["sweep"] + ["--alphas", "-0.5,0.5"]))
    assert sweep.alphas == [-0.5, 0.5]
    ab = parser.parse_args(join_negative_values(commands(files)["ab-curve"] + ["--multipliers", "-2,-1,0"]))
    assert ab.multipliers == [-2.0, -1.0, 0.0]
    generate = parser.parse_args(join_negative_values(with_value(commands(files)["generate"], "--alpha", "-0.5")))
    assert generate.alpha == -0.5 and generate.prompt == ["Hello"]


def test_layer_range_is_checked_against_the_model_without_expanding_it(files, capsys):
    """``0-1000000000000`` is two numbers until the model's depth is known; then one line, exit 2."""
    asked = []

    def stub_loader(name, *, device, dtype):
        asked.append((name, device, dtype))
        return SimpleNamespace(cfg=SimpleNamespace(n_layers=3, d_model=8, model_name="stub"))

    pairs = str(data_dir() / "personas" / "librarian.jsonl")
    argv = with_value(commands(files)["extract"], "--pairs", pairs) + [
        "--layers", "0-1000000000000", "--model", "m", "--dtype", "bfloat16"]
    assert main(argv, load_model=stub_loader) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("loaded stub")  # the loader's report, then the one error line
    assert err[1:] == [
        "lens-roles extract: error: layer 1000000000000 is out of range for stub with 3 layers (0..2); "
        "fix --layers 0-1000000000000"
    ]
    assert asked == [("m", "cpu", torch.bfloat16)]


def test_read_only_location_is_really_read_only_here():
    """The read-only tests rely on /proc refusing new files even to root."""
    assert os.path.isdir("/proc") and not os.path.exists(READ_ONLY)


def test_shipped_set_names_pass_the_input_check(tmp_path):
    """``--pairs librarian`` / ``--baseline baseline`` name shipped sets: the check lets them through to the loader."""
    from lens_roles.cli import main

    def loader(*args, **kwargs):
        raise RuntimeError("reached the loader")

    for argv in (["extract", "--pairs", "librarian", "--out", str(tmp_path / "l.safetensors")],
                 ["roles", "--roles", "chemist", "--baseline", "baseline", "--out", str(tmp_path / "roles")]):
        with pytest.raises(RuntimeError, match="reached the loader"):
            main(argv, load_model=loader)


@pytest.mark.parametrize("command", ["extract", "roles", "evaluate", "ab-curve", "train-sae"])
@pytest.mark.parametrize("option, value", [("--workers", "0"), ("--gpus-per-worker", "-1"),
                                           ("--ray", "127.0.0.1:9"), ("--ray", "nowhere")])
def test_ray_options_are_checked_before_loading(files, capsys, command, option, value):
    check_rejected(files, capsys, command, option, value)
