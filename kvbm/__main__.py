"""``python -m kvbm``: the ``kvbm`` command."""

from kvbm.cli import main

raise SystemExit(main())
