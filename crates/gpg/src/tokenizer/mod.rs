//! Hugging Face tokenizer.json via `tokenizers`, chat templates via `minijinja`.
