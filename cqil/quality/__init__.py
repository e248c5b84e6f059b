"""Quality tools for CQIL: measure layer similarity, recover quality with LoRA, measure perplexity.

- `similarity`: cosine similarity of layer inputs, and the range it suggests (cqil-analyze)
- `finetune`, `adapter`: LoRA self-distillation on the CQIL GraphModule; `merge_adapter` (cqil-finetune)
- `perplexity`, `targets`: strided perplexity of a checkpoint, a plan, an adapter or an engine (cqil-eval)

Heavy imports (transformers, peft, matplotlib) happen inside the functions that need them.
"""

from cqil.quality.adapter import merge_adapter

__all__ = ["merge_adapter"]
