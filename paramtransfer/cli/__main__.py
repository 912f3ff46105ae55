"""``python -m paramtransfer.cli`` is the ``paramtransfer`` command."""

import sys

from paramtransfer.cli import main

sys.exit(main())
