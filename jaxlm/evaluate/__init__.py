"""Evaluation of language models, trained here or imported.

- `tasks`: multiple-choice task files and the built-in next-line task.
- `scoring`: log-probabilities of packed token sequences (the shared forward pass).
- `choices`: multiple-choice accuracy, each question's context run once (KV cache).
- `text`: loss, perplexity and bits per byte of text files over documented windows.
- `trained`: the model of a run's checkpoint, an imported checkpoint or a Hugging Face directory.
- `lm_eval`: the EleutherAI lm-evaluation-harness model `jaxlm` (extra `[eval]`).
"""
