"""The README's settings table is the one ``core.settings_table`` generates: every setting, with its
default and its description, and no stale row."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import Settings, setting_names
from core.settings_table import BEGIN, END, replace_table, settings_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_described() -> None:
    missing = [name for name, f in setting_names() if not f.description]
    missing += [name for name, f in Settings.model_fields.items() if not f.description]
    assert missing == []


def test_the_readme_table_is_current() -> None:
    text = README.read_text()
    assert replace_table(text, settings_table()) == text, (
        "README.md's settings table is stale: run `python -m core.settings_table --write README.md`"
    )
    rows = [
        line for line in text.split(BEGIN)[1].split(END)[0].splitlines() if line.startswith("| `")
    ]
    assert len(rows) == len(list(setting_names()))
    assert "| `HYMIREC_KAFKA_BOOTSTRAP` | (empty) |" in text


def test_the_markers_must_each_appear_once() -> None:
    with pytest.raises(ConfigError, match="markers"):
        replace_table(f"{BEGIN}\n{BEGIN}\n{END}\n", "| t |\n")
    with pytest.raises(ConfigError, match="markers"):
        replace_table(f"{END}\n{BEGIN}\n", "| t |\n")
