"""``python -m kvmlab.cli``: the same as the ``kvmlab`` command."""

import sys

from kvmlab.cli import main

sys.exit(main())
