"""deepseek_sft: a reproducible SFT template for DeepSeek-family models (DVC + DeepSpeed)."""

__version__ = "0.1.0"
