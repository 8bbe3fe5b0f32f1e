"""Getting models in and out: Hugging Face safetensors and GGUF -> Orbax conversion and loading
(`checkpoint`, `gguf_loader`), the tokenizer (`tokenizer`) and the embedded default model
(`default_model`). Nothing here runs the model."""
