"""`ray job submit` driver for a Ray Tune sweep over pretraining: the same code path as `dreamdiff sweep`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"py_modules": ["platform/dreamdiff"]}' -- \
        python jobs/sweep.py --config configs/sweep-paper.yaml output=/shared/runs/sweep-paper

Make `output`, `base.data` and `probe_data` paths every node can read (and `output` write): trials run on any
node. Re-submitting the same command resumes the sweep: finished trials are kept, unfinished ones continue.
"""

import sys

from dreamdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
