"""Driver of the finetune stage for `ray job submit`: the CLI's code path, nothing else.

From the repository root, against a cluster's dashboard address:

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"py_modules": ["platform/dreamdiff"]}' -- \
        python jobs/finetune.py --config configs/finetune-sd15.yaml \
            data=/shared/shards/paired output=/shared/runs/finetune-sd15 encoder_checkpoint=/shared/runs/pretrain-large

`--working-dir .` ships this checkout (configs/, jobs/) as the job's working directory; `py_modules` puts
this checkout's `dreamdiff` on the driver's and every worker's path. Make `data`, `output` and
`encoder_checkpoint` folders every node can read (and `output` write): the precomputed rows, Ray Train's
checkpoints and the generator are written there. Arguments are those of `dreamdiff finetune`: `--config
FILE`, `--print-config`, any `dotted.key=value` override. Re-submitting the same command resumes from the
last checkpoint. The exit status is the CLI's (0 done, 2 bad config or input).
"""

from __future__ import annotations

import sys

from dreamdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
