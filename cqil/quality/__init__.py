"""Quality tools for CQIL: measure layer similarity, recover quality with LoRA, measure perplexity.

- `similarity`, `plot`: cosine similarity of layer inputs, and the range it suggests (cqil-analyze)
- `finetune`, `lora`: LoRA self-distillation on the CQIL GraphModule (cqil-finetune); merging an
  adapter is part of loading a model (`cqil.model.adapter`)
- `perplexity`, `targets`: strided perplexity of a checkpoint, a plan, an adapter or an engine (cqil-eval)

Heavy imports (transformers, peft, matplotlib) happen inside the functions that need them.
"""
