"""The distillation sweep as a Ray job: `ray job submit --working-dir . -- python jobs/distill_sweep.py`.

The job ships with the package as `raysys.jobs.distill_sweep` (`python -m raysys.jobs.distill_sweep --help` lists its flags);
this file keeps the repo's `python jobs/distill_sweep.py` command line.
"""

import sys

from raysys.jobs.distill_sweep import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
