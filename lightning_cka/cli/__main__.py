"""``python -m lightning_cka.cli``, the same as the ``lightning-cka`` command."""

import sys

from lightning_cka.cli import main

sys.exit(main())
