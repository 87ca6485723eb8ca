"""The whole loop as a Ray job: `ray job submit --working-dir . -- python jobs/pipeline.py --preset demo`.

The job ships with the package as `raysys.jobs.pipeline` (`python -m raysys.jobs.pipeline --help` lists its flags);
this file keeps the repo's `python jobs/pipeline.py` command line.
"""

import sys

from raysys.jobs.pipeline import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
