"""Entry point for `ray job submit`: `dipo-scale scalability` on the cluster this job runs in.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/scalability.py ARGS...

ARGS are those of `dipo-scale scalability` (see `dipo-scale scalability --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the uploaded working dir

from dipo_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["scalability", *sys.argv[1:]]))
