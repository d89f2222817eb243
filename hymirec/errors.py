"""Moved to ``core.errors`` (the floor package); this name stays until every import has moved."""

from core.errors import *  # noqa: F403
