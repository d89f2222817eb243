"""hymirec-platform: streaming online learning and A/B testing for multi-interest recommenders."""

from core.settings import Settings, load_settings

__all__ = ["Settings", "load_settings"]
__version__ = "0.1.0"
