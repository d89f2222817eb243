"""Moved to ``core.movielens`` (the floor package); this name stays until every import has moved."""

from core.movielens import *  # noqa: F403
