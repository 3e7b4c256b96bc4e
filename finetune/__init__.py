"""longtune: long-context fine-tuning for Llama-family models."""
