"""Dispatcher settings: defaults, validation, plugin settings."""

from __future__ import annotations

import math
from typing import Any

import pytest

from dispatchkit import Dispatcher, UsageError


def test_defaults_are_finite() -> None:
    with Dispatcher() as d:
        s = d.settings
    assert 0 < s.timeout < math.inf
    assert s.max_response_bytes == 16 * 1024 * 1024
    assert s.verify is True
    assert s.retry_attempts >= 1
    assert 0 < s.retry_max_time < math.inf


@pytest.mark.parametrize(
    "bad",
    [
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": math.inf},
        {"timeout": "5"},
        {"timeout": True},
        {"pool_maxsize": 0},
        {"max_response_bytes": 1.5},
        {"retry_attempts": 0},
        {"retry_max_time": math.nan},
        {"retry_backoff": -1},
        {"client_key": "/k.pem"},
    ],
)
def test_bad_settings(bad: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match=next(iter(bad))):
        Dispatcher(**bad)


def test_a_misspelt_setting_is_an_error() -> None:
    with pytest.raises(UsageError, match="'timout'"):
        Dispatcher(timout=5)


def test_settings_are_frozen() -> None:
    with Dispatcher() as d, pytest.raises(AttributeError):
        d.settings.timeout = 1  # type: ignore[misc]
