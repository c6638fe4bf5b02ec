"""``python -m comfy_queue``: the batch runner's command line."""
import sys

from .cli import main

sys.exit(main())
