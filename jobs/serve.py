"""`ray job submit` driver for the online endpoint: the same code path as `dreamdiff serve`.

Deploys the app on the cluster's Serve (HTTP proxy host/port of the config) and keeps the job alive until it is
stopped: `ray job stop` sends SIGTERM, which `dreamdiff serve` handles as Ctrl-C (it takes the signal back from
`ray.init`), deleting the app and printing "dreamdiff serve: stopped". The delete request reaches Serve's
controller at once, so the app goes even when `ray job stop` SIGKILLs the driver after its short wait
(RAY_JOB_STOP_WAIT_TIME_S). For a long-lived deployment prefer `serve deploy configs/serve-app.yaml` or the
RayService manifest, which do not tie the app to a job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"py_modules": ["platform/dreamdiff"]}' -- \
        python jobs/serve.py --config configs/serve-gpu.yaml checkpoint=/shared/runs/finetune-sd15/generator
"""

import sys

from dreamdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
