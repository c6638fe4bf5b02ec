"""``python -m tbac_core``: the command line (see ``tbac_core.cli``)."""
import sys

from .cli import main

sys.exit(main())
