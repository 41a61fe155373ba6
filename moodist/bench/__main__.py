"""``python -m moodist.bench``: the ``moodist-bench`` command."""

import sys

from . import main

if __name__ == "__main__":  # not in the ranks that spawn re-imports this module as
    sys.exit(main())
