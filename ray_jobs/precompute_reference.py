"""Entry point for `ray job submit`: the reference-statistics precompute on the cluster this job runs in.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/precompute_reference.py \\
        --config configs/unlearn.yaml --set reference.form=hidden --set reference.cache_dir=DIR

ARGS are those of `dipo-scale reference` (see `dipo-scale reference --help`). The job is
resumable: submitting it again after a stop computes only the shards not yet written.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the uploaded working dir

from dipo_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["reference", *sys.argv[1:]]))
