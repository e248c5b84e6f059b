"""Runtime: run an engine directory (`load`), with ranks as threads or as processes."""

from cqil.runtime.engine import Engine, load

__all__ = ["Engine", "load"]
