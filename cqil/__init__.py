"""cqil: compile LLaMA-family models so that quasi-independent layers run concurrently (CQIL)."""

from cqil.errors import CqilError
from cqil.plan import Plan

__version__ = "0.1.0"
__all__ = ["CqilError", "Plan", "__version__"]
