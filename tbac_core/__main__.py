"""``python -m tbac_core``: the command line (see ``tbac_core.cli.main``)."""
import sys

from .cli.main import main

sys.exit(main())
