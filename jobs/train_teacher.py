"""Teacher training as a Ray job: `ray job submit --working-dir . -- python jobs/train_teacher.py --strategy zero3`.

The job ships with the package as `raysys.jobs.train_teacher` (`python -m raysys.jobs.train_teacher --help` lists its flags);
this file keeps the repo's `python jobs/train_teacher.py` command line.
"""

import sys

from raysys.jobs.train_teacher import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
