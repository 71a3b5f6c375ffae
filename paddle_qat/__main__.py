"""``python -m paddle_qat --help``."""

import sys

from .cli import main

sys.exit(main())
