"""`ray job submit` driver for batch generation: the same code path as `dreamdiff generate`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"py_modules": ["platform/dreamdiff"]}' -- \
        python jobs/batch_generate.py --config configs/generate-gpu.yaml input=/shared/shards/paired max_eeg=100
"""

import sys

from dreamdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
