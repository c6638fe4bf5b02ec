"""``python -m tbac_core``: the command line (see ``tbac_core.cli``)."""
import sys

from .cli.app import main

sys.exit(main())
