"""The settings dataclasses: ConfigError on bad values (naming class, field and value) and
``to_dict`` / ``from_dict`` round trips (tuples restored, unknown keys refused)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import lens_roles as lr
from lens_roles.analysis.sae.training import SAETrainConfig
from lens_roles.errors import ConfigError, LensRolesError
from lens_roles.interventions.psr.train import TrainConfig
from lens_roles.measures.multiple_choice import Condition
from lens_roles.studies.psr_compare import CompareConfig
from lens_roles.studies.role_study import StudyConfig

CONFIGS = [
    TrainConfig(objective="kl", epochs=2, read_layers=(1, 3)),
    TrainConfig(),
    CompareConfig(target_perplexity=3.5, steps=2),
    StudyConfig(layers=(0, 2), alphas=(1.0, 4.0), max_val=None, conditions=("addition",)),
    StudyConfig(),
    SAETrainConfig(d_sae=64, k=None, l1=0.5),
    Condition("addition", 3, 2.0),
    Condition("prompting", system="You are a judge."),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_round_trip_through_json(config):
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON data
    back = type(config).from_dict(json.loads(json.dumps(data)))
    assert back == config
    for name, value in vars(config).items():
        assert type(getattr(back, name)) is type(value)  # tuples come back as tuples


def test_to_dict_lists_every_field_with_tuples_as_lists():
    data = StudyConfig(layers=(0, 2)).to_dict()
    assert data["layers"] == [0, 2] and data["alphas"] == [0.5, 1.0, 2.0]
    assert list(data) == [f for f in StudyConfig.__dataclass_fields__]


def test_from_dict_keeps_defaults_for_missing_keys():
    assert TrainConfig.from_dict({"epochs": 7}) == TrainConfig(epochs=7)
    assert CompareConfig.from_dict({}) == CompareConfig()


def test_from_dict_refuses_unknown_keys_by_name():
    with pytest.raises(ConfigError, match=r"TrainConfig has no field\(s\) 'epoch', 'rate'; its fields are "
                                          r"objective, epochs"):
        TrainConfig.from_dict({"epoch": 3, "rate": 0.1})
    with pytest.raises(ConfigError, match="needs a mapping"):
        StudyConfig.from_dict([("seed", 1)])


def test_from_dict_validates_like_the_constructor():
    with pytest.raises(ConfigError, match="StudyConfig: level must be in"):
        StudyConfig.from_dict({"level": 1.5})


@pytest.mark.parametrize("build, message", [
    (lambda: TrainConfig(objective="l1"), r"TrainConfig: unknown objective 'l1'; use one of mse, kl"),
    (lambda: TrainConfig(lr=float("inf")), r"TrainConfig: lr must be positive and finite, got inf"),
    (lambda: TrainConfig(batch_size=0), r"TrainConfig: batch_size must be a positive integer, got 0"),
    (lambda: CompareConfig(target_perplexity=0.5), r"CompareConfig: target_perplexity must be .*got 0.5"),
    (lambda: CompareConfig(max_new_tokens=1), r"CompareConfig: max_new_tokens must be an integer >= 2, got 1"),
    (lambda: CompareConfig(steps=0), r"CompareConfig: steps must be a positive integer, got 0"),
    (lambda: CompareConfig(alpha_hi=-1.0), r"CompareConfig: alpha_hi must be positive, got -1.0"),
    (lambda: CompareConfig(tolerance=0.0), r"CompareConfig: tolerance must be positive, got 0.0"),
    (lambda: StudyConfig(alphas=()), r"StudyConfig: alphas must not be empty .*got alphas=\(\)"),
    (lambda: StudyConfig(n_boot=10), r"StudyConfig: n_boot must be at least 100, got 10"),
    (lambda: StudyConfig(max_val=0), r"StudyConfig: max_val must be positive or None, got 0"),
    (lambda: SAETrainConfig(k=None, l1=None), r"SAETrainConfig: give exactly one of k .* got k=None and l1=None"),
    (lambda: SAETrainConfig(d_sae=8, k=8), r"SAETrainConfig: k must be in 1..d_sae-1, got k=8 with d_sae=8"),
    (lambda: SAETrainConfig(samples=0), r"SAETrainConfig: samples must be >= 1, got 0"),
    (lambda: Condition("steer"), r"Condition: unknown condition kind='steer'; use one of none"),
    (lambda: Condition("addition", 2), r"Condition: condition 'addition' needs alpha, got alpha=None"),
    (lambda: Condition("prompting"), r"Condition: condition 'prompting' needs a system prompt, got system=None"),
])
def test_bad_values_are_config_errors_naming_field_and_value(build, message):
    with pytest.raises(ConfigError, match=message) as info:
        build()
    assert isinstance(info.value, LensRolesError) and isinstance(info.value, ValueError)


def test_config_error_is_exported():
    assert lr.ConfigError is ConfigError and "ConfigError" in lr.__all__
    assert issubclass(lr.PlotError, lr.LensRolesError) and "PlotError" in lr.__all__


def test_every_exception_class_lives_in_errors_and_no_bare_builtin_is_raised():
    """The error contract: exception classes only in ``errors.py``; every deliberate ``raise`` a
    ``LensRolesError`` (left: ``TypeError`` for a wrong call signature, Python's own contract, and the
    ``ValueError`` that ``parse_layers`` raises and catches itself)."""
    allowed = {("directions/builders.py", "TypeError"), ("runtime/models.py", "ValueError")}
    root = Path(lr.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and rel != "errors.py":
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not any(b.endswith(("Error", "Exception")) for b in bases), f"{rel}: class {node.name}"
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = getattr(exc, "id", None)
                if name in {"ValueError", "TypeError", "KeyError", "RuntimeError", "IndexError"} \
                        and (rel, name) not in allowed:
                    found.append(f"{rel}:{node.lineno} raises {name}")
    assert not found, found
