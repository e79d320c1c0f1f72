"""Entry point for `ray job submit`: the `attack` stage (the evaluation after quantization and
relearning attacks) on the cluster this job runs in; the relearning run's workers run there too.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/attack.py ARGS...

ARGS are those of `dipo-scale attack` (see `dipo-scale attack --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the uploaded working dir

from dipo_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["attack", *sys.argv[1:]]))
