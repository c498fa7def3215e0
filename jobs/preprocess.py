"""Driver of the preprocess stage for `ray job submit`: the CLI's code path, nothing else.

From the repository root, against a cluster's dashboard address:

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"py_modules": ["platform/dreamdiff"]}' -- \
        python jobs/preprocess.py --config configs/preprocess-demo.yaml output=/shared/shards

`--working-dir .` ships this checkout (configs/, jobs/) as the job's working directory; `py_modules`
puts this checkout's `dreamdiff` on the driver's and every worker's path. `python` is the nodes'
Python, with dreamdiff's dependencies installed. Make `output` a folder every node can write (a
relative one would land in the job's temporary copy of the working directory). Arguments are those
of `dreamdiff preprocess`: `--config FILE`, `--print-config`, any `dotted.key=value` override. The
job joins its cluster through RAY_ADDRESS, which `ray job submit` sets (the config's `ray.num_cpus`
applies only to a local Ray); its exit status is the CLI's (0 done, 2 bad config or input).
"""

from __future__ import annotations

import sys

from dreamdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
