"""posettp: 2D pose estimation with test-time personalization; `posettp.load` is the Python API."""
from .api import load

__all__ = ["load"]
