"""``python -m tap_fast``: the tap-fast command line."""
from tap_fast.cli import main

raise SystemExit(main())
