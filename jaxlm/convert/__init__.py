"""Weight conversion between jaxlm checkpoints and other formats (Hugging Face: `hf.py`)."""
