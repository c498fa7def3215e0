"""`ray job submit` driver for the demo: the same code path as `dreamdiff demo`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"py_modules": ["platform/dreamdiff"]}' -- python jobs/demo.py --quick
"""

import sys

from dreamdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
