"""``python -m dpft`` = ``dpft``."""
import sys

from dpft.cli import main

sys.exit(main())
