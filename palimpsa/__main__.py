"""``python -m palimpsa`` is the ``palimpsa`` command."""

import sys

from palimpsa.cli import main

sys.exit(main())
