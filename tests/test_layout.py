"""The package's layout promises: the root API works, the data flow is one-way (import-linter, run by
``make test``), and the patterns the redesign removed stay out."""

from __future__ import annotations

import re
from pathlib import Path

import lens_roles as lr

PACKAGE = Path(lr.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_root_name_resolves():
    missing = [name for name in lr.__all__ if not hasattr(lr, name)]
    assert not missing
    assert len(set(lr.__all__)) == len(lr.__all__)


def test_removed_patterns_stay_out():
    found = []
    for path in SOURCES:
        text = path.read_text()
        rel = path.relative_to(PACKAGE.parent)
        if "noqa: E402" in text:
            found.append(f"{rel}: '# noqa: E402'")
        if re.search(r"hook\.name\.split\(", text):
            found.append(f"{rel}: parses the layer out of a hook name (use hook.layer())")
        if re.search(r"from lens_roles(\.\w+)* import [^\n]*\b_[a-z]\w*", text):
            found.append(f"{rel}: imports a private name across modules")
        if re.search(r"^from lens_roles import ", text, re.M) and rel.name != "__init__.py":
            found.append(f"{rel}: imports from the package root (import the module that defines the name)")
    assert not found, "\n".join(found)


def test_every_subpackage_is_in_the_layer_contract():
    contract = (PACKAGE.parent / "pyproject.toml").read_text()
    layers = re.findall(r'"(lens_roles\.[\w.]+(?: \| lens_roles\.[\w.]+)*)"', contract.split("layers = [", 1)[1])
    named = {name.strip() for layer in layers for name in layer.split("|")}
    top = {f"lens_roles.{p.stem if p.is_file() else p.name}" for p in PACKAGE.iterdir()
           if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert top <= named, f"not in the import-linter layers: {sorted(top - named)}"
