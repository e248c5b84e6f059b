"""The model frontend: a HuggingFace checkpoint as a traceable LLaMA-family model.

- `config`: `ModelConfig` from config.json (Llama, Mistral, Qwen2), refusing what cannot run faithfully
- `model`: `CausalLM`, the traceable decoder with HF parameter names and an explicit KV cache
- `loader`: lazy, per-tensor loading (meta model + `Weights`), `load_model` (with an adapter merged)
- `adapter`: the plan a LoRA adapter was trained for, and merging it
- `trace`: torch.fx tracing with decoder layers tagged
- `tokenizer`: which files make a tokenizer, loading it

Nothing here knows about plans beyond checking an adapter's, about passes, exports or runtimes.
"""
