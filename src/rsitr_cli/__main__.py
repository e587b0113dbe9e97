"""``python -m rsitr_cli``: the ``rsitr`` console script."""

import sys

from rsitr_cli.main import main

sys.exit(main())
