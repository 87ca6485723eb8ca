"""Retrain after a drift alert, as a Ray job: `ray job submit -- python jobs/retrain.py --traffic-uri ...`.

The job ships with the package as `raysys.jobs.retrain` (`python -m raysys.jobs.retrain --help` lists its flags);
this file keeps the repo's `python jobs/retrain.py` command line.
"""

import sys

from raysys.jobs.retrain import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
