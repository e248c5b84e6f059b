"""cqil: compile LLaMA-family models so that quasi-independent layers run concurrently (CQIL).

    cqil.compile("model_dir", "engine_dir", p=2)     # checkpoint -> engine directory
    engine = cqil.load("engine_dir")                 # ONNX Runtime, one thread per rank
    engine.generate([[1, 2, 3]], max_new_tokens=16)
"""

from cqil.errors import CqilError
from cqil.plan import Plan

__version__ = "0.1.0"


def compile(model_dir, out_dir, **options):
    """Compile a HuggingFace checkpoint folder into an engine directory (see cqil-compile --help)."""
    from cqil.compiler.compile import compile_model

    return compile_model(model_dir, out_dir, **options)


def load(engine_dir, **options):
    """Open an engine directory; returns a `cqil.runtime.engine.Engine`."""
    from cqil.runtime.engine import load as _load

    return _load(engine_dir, **options)


__all__ = ["CqilError", "Plan", "compile", "load", "__version__"]
