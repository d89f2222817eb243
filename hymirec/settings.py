"""Moved to ``core.settings`` (the floor package); this name stays until every import has moved."""

from core.settings import *  # noqa: F403
from core.settings import EXPERIMENTS_FILE, FEATURE_REPO_DIR  # noqa: F401
