"""Data stages: sources -> curate -> tokenizer -> records -> pipeline."""
