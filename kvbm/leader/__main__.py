"""``python -m kvbm.leader``: run a leader process (see :func:`kvbm.leader.process.main`)."""

import sys

from kvbm.leader.process import main

sys.exit(main())
