"""Tier 3 (Ray integration): every test here runs with the session's endpoint API key in effect
(`endpoint_api_key` in tests/conftest.py), whether it uses the session's local Ray or starts its own."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _endpoint_key_everywhere(endpoint_api_key) -> str:
    return endpoint_api_key
