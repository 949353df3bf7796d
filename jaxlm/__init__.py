"""jaxlm: language-model pretraining in JAX/Flax, from corpus to checkpoint to Hugging Face."""

__version__ = "0.1.0"
