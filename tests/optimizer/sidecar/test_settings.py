"""The nested `optimizer` settings: YAML, environment and flags merge field by field."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigurationError
from gateway.settings import load_settings

UPSTREAM = "http://127.0.0.1:9/v1"


def test_defaults_suit_production() -> None:
    options = load_settings(upstream=UPSTREAM).optimizer

    assert options.interval == 3600
    assert options.canary_share == 0
    assert options.metrics_host == "127.0.0.1"
    assert options.models == []


def test_sources_merge_field_by_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("optimizer:\n  interval: 600\n  margin: 0.3\n")
    monkeypatch.setenv("DRPO_OPTIMIZER__WINDOW", "42")
    monkeypatch.setenv("DRPO_OPTIMIZER__MARGIN", "0.2")

    options = load_settings(
        config, upstream=UPSTREAM, optimizer={"min_new_samples": 7}
    ).optimizer

    assert options.interval == 600
    assert options.window == 42
    assert options.margin == 0.2
    assert options.min_new_samples == 7


def test_flag_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRPO_OPTIMIZER__INTERVAL", "600")

    options = load_settings(upstream=UPSTREAM, optimizer={"interval": 5}).optimizer

    assert options.interval == 5


def test_invalid_value_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRPO_OPTIMIZER__CANARY_SHARE", "1.5")

    with pytest.raises(ConfigurationError, match="DRPO_OPTIMIZER__CANARY_SHARE"):
        load_settings(upstream=UPSTREAM)


def test_helper_url_needs_scheme() -> None:
    with pytest.raises(ConfigurationError, match="DRPO_OPTIMIZER__HELPERS"):
        load_settings(upstream=UPSTREAM, optimizer={"helpers": "gpu-host:8000/v1"})
