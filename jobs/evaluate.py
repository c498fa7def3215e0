"""Driver of the evaluate stage for `ray job submit`: the CLI's code path, nothing else.

From the repository root, against a cluster's dashboard address:

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"py_modules": ["platform/dreamdiff"]}' -- \
        python jobs/evaluate.py --config configs/evaluate-demo.yaml checkpoint=/shared/runs/finetune-sd15/generator \
        data=/shared/shards/paired output=/shared/runs/evaluate-sd15

The stage runs in the job's driver process (torch alone, on the driver node's GPU if it has one); Ray
only ships the code. Give `checkpoint`, `data`, `classifier` and `output` as paths the driver node can
read and write. Arguments are those of `dreamdiff evaluate`: `--config FILE`, `--print-config`, any
`dotted.key=value` override; the exit status is the CLI's (0 done, 2 bad config or input).
"""

from __future__ import annotations

import sys

from dreamdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
