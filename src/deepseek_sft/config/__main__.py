"""`python -m deepseek_sft.config [params.yaml]`: validate the whole params file (make check-params)."""

import sys

from . import main

sys.exit(main())
