"""`python -m alaya_jax.eval eval ...` / `python -m alaya_jax.eval eval-ppl ...` (no install needed)."""

import sys

from alaya_jax.eval.cli import main

sys.exit(main())
