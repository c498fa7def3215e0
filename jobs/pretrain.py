"""`ray job submit` driver for MSM pretraining: the same code path as `dreamdiff pretrain`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"py_modules": ["platform/dreamdiff"]}' -- \
        python jobs/pretrain.py --config configs/pretrain-large.yaml data=/shared/shards/epochs
"""

import sys

from dreamdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
