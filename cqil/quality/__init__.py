"""Quality tools for CQIL: measure layer similarity, recover quality with LoRA, measure perplexity and tasks.

- `similarity`, `plot`: cosine similarity of layer inputs, and the range it suggests (cqil-analyze)
- `finetune` (the command line), `train` (the loop: precision, accumulation, schedule), `student`
  (the peft-wrapped CQIL graph), `ddp` (data parallel processes), `checkpoint` (the run's folder),
  `lora`: LoRA self-distillation (cqil-finetune); merging an adapter is part of loading a model
  (`cqil.model.adapter`)
- `perplexity`, `targets`: strided perplexity of a checkpoint, a plan, an adapter or an engine (cqil-eval)
- `lm_eval`: the same targets as an lm-evaluation-harness model type (cqil-eval --tasks)
- `data`, `options`: every --data format, and the flags the commands share

Heavy imports (transformers, peft, datasets, lm_eval, matplotlib) happen inside the functions that
need them; `cqil.quality.lm_eval` imports lm_eval when it is imported.
"""
