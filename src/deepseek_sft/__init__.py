"""deepseek_sft: a reproducible SFT template for DeepSeek-family models (DVC + DeepSpeed)."""

import os
import sys
from pathlib import Path

__version__ = "0.1.0"

# DeepSpeed compiles its CPU ops on first use (the shared-memory all-reduce in ~27 s, cpu_adam in minutes) into
# ~/.cache/torch_extensions, one directory for every environment. A build against another virtualenv's headers
# replaces it, so two checkouts side by side recompiled the op on every run. Inside a virtualenv, keep the ops
# with it unless the user chose a directory.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
