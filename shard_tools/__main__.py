"""``python -m shard_tools ...`` is ``lc-shard ...``."""
import sys

from .cli import main

sys.exit(main())
