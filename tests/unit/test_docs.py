"""docs/configuration.md is generated from the settings classes and committed: it must not drift from them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from producer.settings import ClientSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("settings_doc", ROOT / "tools" / "settings_doc.py")
    assert spec is not None and spec.loader is not None, "tools/settings_doc.py is missing"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_configuration_page_is_what_the_settings_generate() -> None:
    page = ROOT / "docs" / "configuration.md"
    committed = page.read_text() if page.exists() else ""
    assert _generator().render() == committed, "docs/configuration.md is out of date with the settings: run `make docs`"


def test_every_setting_has_a_row_with_its_env_var_and_a_description() -> None:
    page = _generator().render()
    for name, field in WorkerSettings.model_fields.items():
        assert f"| `RENDER_{name.upper()}` |" in page, name
        assert field.description, f"WorkerSettings.{name} has no description= for docs/configuration.md"
    assert set(ClientSettings.model_fields) <= set(WorkerSettings.model_fields)


def test_every_docs_page_is_linked_from_the_readme_and_every_relative_link_resolves() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").rglob("*.md")):
        assert f"({page.relative_to(ROOT).as_posix()}" in readme, f"README.md's Read on list lacks {page}"
    for source in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", source.read_text()):
            assert (source.parent / target).exists(), f"{source.relative_to(ROOT)} links to {target}, which is missing"


def test_the_readme_stays_a_front_door() -> None:
    """The reference lives in docs/; the README says what this is, the two commands, a first job, where to read on."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250, "README.md is 250 lines or more: move the reference into docs/"
    assert "make demo" in readme and "make test" in readme and "## Python API" in readme
