"""The settings module: every DSF_* variable validated in one place, with clear errors."""

from __future__ import annotations

import re

import pytest

from dsf_runtime import settings
from dsf_runtime.errors import ConfigError


def test_every_variable_read_in_the_package_is_declared():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    used = set()
    for folder in ("dsf_runtime", "converters", "serve", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            used |= set(re.findall(r"[\"'](DSF_[A-Z0-9_]+)[\"']", path.read_text(encoding="utf-8")))
    assert used <= set(settings.SETTINGS), used - set(settings.SETTINGS)


@pytest.mark.parametrize(
    "name,text,value",
    [
        ("DSF_CPU_ISA", "avx2", "avx2"),
        ("DSF_AVX512_WIDTH", None, "auto"),
        ("DSF_NZ_MIN_BATCH", "7", 7),
        ("DSF_COLUMNS_MAX_DENSITY", "0", 0.0),
        ("DSF_COLUMNS_MAX_BATCH", "0", 0),
        ("DSF_DISABLED_BACKENDS", " cpu-bitmap, torch-csr ,", ("cpu-bitmap", "torch-csr")),
        ("DSF_API_KEY", None, None),
    ],
)
def test_values(monkeypatch, name, text, value):
    if text is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, text)
    assert settings.get(name) == value


@pytest.mark.parametrize(
    "name,text,fragment",
    [
        ("DSF_CPU_ISA", "sse2", "must be avx512, avx2 or portable"),
        ("DSF_NZ_MIN_BATCH", "0", "must be a positive integer"),
        ("DSF_NZ_MIN_BATCH", "1.5", "must be a positive integer"),
        ("DSF_COLUMNS_MAX_BATCH", "-1", "must be a non-negative integer"),
        ("DSF_COLUMNS_MAX_DENSITY", "nan", "must be a number in [0, 1]"),
        ("DSF_COLUMNS_MAX_DENSITY", "2", "must be a number in [0, 1]"),
    ],
)
def test_bad_values_are_clear_errors(monkeypatch, name, text, fragment):
    monkeypatch.setenv(name, text)
    with pytest.raises(ConfigError, match=rf"{name} {re.escape(fragment)}, not '{re.escape(text)}'"):
        settings.get(name)


def test_describe_masks_secrets_and_cache_dir_follows_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("DSF_API_KEY", "hunter2")
    monkeypatch.setenv("DSF_CACHE_DIR", str(tmp_path))
    rows = {r["name"]: r for r in settings.describe()}
    assert rows["DSF_API_KEY"]["value"] == "(set)" and "hunter2" not in str(rows)
    assert settings.cache_dir() == tmp_path
    with pytest.raises(KeyError):
        settings.raw("DSF_NOT_A_SETTING")


def test_the_settings_page_lists_every_variable():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text(encoding="utf-8")
    for name in settings.SETTINGS:
        assert f"| `{name}` |" in page, name
