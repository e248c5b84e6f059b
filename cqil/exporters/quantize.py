"""Weight-only quantization of exported segments with ONNX Runtime's own tooling.

    cqil-compile MODEL --p 2 -o ENGINE --quant int4 [--quant-block 32] [--quant-asymmetric]
                 [--quant-lm-head/--no-quant-lm-head] [--quant-embedding]

Every MatMul whose weight is an initializer becomes `com.microsoft:MatMulNBits`
(`onnxruntime.quantization.matmul_nbits_quantizer`): the weight [K, N] is stored as 4- or 8-bit
integers in blocks of `block` along K with one fp32 scale per block (and a zero point when
asymmetric). MatMuls between activations are left alone. `accuracy_level=4` lets ONNX Runtime's CPU
kernels quantize the activations to int8 per block too (its fastest path, and what
onnxruntime-genai's int4 models use). The LM head is quantized unless told not to; the embedding
(a Gather) only when asked (`GatherBlockQuantized`).

Quality: docs/quality.md measures int4 and int8 perplexity against fp32 on the fixture model.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from cqil.errors import CqilError, first_line
from cqil.exporters.onnx import rewrite

BITS = {"int4": 4, "int8": 8}


@dataclass(frozen=True)
class Quantization:
    kind: str  # "int4" | "int8"
    block: int = 32
    symmetric: bool = True
    lm_head: bool = True
    embedding: bool = False
    accuracy_level: int = 4

    def __post_init__(self):
        if self.kind not in BITS:
            raise CqilError(f"--quant must be one of {', '.join(BITS)}, got {self.kind!r}")
        if self.block < 16 or self.block & (self.block - 1):
            raise CqilError(f"--quant-block must be a power of two >= 16, got {self.block}")

    @property
    def bits(self) -> int:
        return BITS[self.kind]

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_segment(path: Path, q: Quantization) -> dict:
    """Quantize the segment file at `path` in place (weights in `path.data` when large); returns
    {"quantized": MatMuls quantized, "kept": MatMuls left in float}."""
    import onnx

    MatMulNBitsQuantizer, QuantFormat = _quantizer()
    path = Path(path)
    model = onnx.load(str(path))
    exclude = [] if q.lm_head else _lm_head(model)
    weighted = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in
                {t.name for t in model.graph.initializer}]
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(
            model, bits=q.bits, block_size=q.block, is_symmetric=q.symmetric, accuracy_level=q.accuracy_level,
            nodes_to_exclude=exclude, op_types_to_quantize=("MatMul", "Gather") if q.embedding else ("MatMul",),
            quant_axes=(("MatMul", 0), ("Gather", 1)), quant_format=QuantFormat.QOperator)
        quantizer.process()
    except Exception as e:  # a shape the quantizer cannot block (K not a multiple of the block, ...)
        raise CqilError(f"quantize: {path.name}: {first_line(e)}") from None
    out = quantizer.model.model
    rewrite(out, path)
    kept = sum(1 for n in out.graph.node if n.op_type == "MatMul" and n.input[1] in {t.name for t in out.graph.initializer})
    return {"quantized": len(weighted) - kept, "kept": kept}


def _quantizer():
    """The quantizer classes. Importing ONNX Runtime's module runs `logging.basicConfig(level=INFO)`,
    which would send every library's INFO records to stderr: the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    root.handlers[:] = handlers
    root.setLevel(level)
    return MatMulNBitsQuantizer, QuantFormat


def _lm_head(model) -> list[str]:
    """Names of the MatMul that makes `logits` (the legacy exporter's node names are not stable)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get("logits")
    return [node.name] if node is not None and node.op_type == "MatMul" else []
