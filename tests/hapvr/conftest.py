"""Fixtures shared by the index, search and API tests (one instance per test session)."""
from tests.hapvr.search_fixtures import checkpoint32, clips_index, corpus  # noqa: F401
