"""jaxlm: language-model pretraining in JAX/Flax, from corpus to checkpoint to Hugging Face."""

from jaxlm import hardware as _hardware

__version__ = "0.1.0"

# Installing libtpu (for compiling to TPU targets on a CPU) must not change a CPU run.
_hardware.keep_off_absent_tpu()
