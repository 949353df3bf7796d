"""Data stages: sources -> curate -> tokenizer -> records (+ manifest) -> pipeline."""
