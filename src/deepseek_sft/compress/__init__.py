"""Stage compress: int8 quantization, magnitude and MoE expert pruning, distillation; each evaluated and gated.

`load_compressed` / `is_compressed` (storage.py) read the variants back; base_model.load_model_and_tokenizer
delegates to them, so evaluate and serve load models/compressed/<method> like any other model directory.
"""

from .storage import is_compressed, load_compressed

__all__ = ["is_compressed", "load_compressed"]
