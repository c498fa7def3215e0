"""The sweep stage: Ray Tune over pretraining settings, each trial a TorchTrainer run, scored downstream.

Reconstruction loss does not compare across mask ratios, so every trial's encoder is scored by a linear probe
on held-out labelled EEG (`probe_accuracy`, reported by the pretrain loop at each checkpoint; see
dreamdiff.eval.probe), and ASHA stops trials whose probe score lags at a rung. A trial is a Tune function that
builds the pretrain TorchTrainer for the base config plus its overrides and fits it with TuneReportCallback
(the Train V2 way). The search space is checked against the pretrain config before any trial starts. Re-running
the same config restores the Tune experiment: finished trials are kept, unfinished and failed ones continue
(each from its own last checkpoint). Outputs: results.csv, score_vs_mask_ratio.png, best_pretrain.yaml.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from dreamdiff.config import (
    ConfigError,
    PretrainConfig,
    SweepConfig,
    apply_overrides,
    dump_config,
    record_config,
    validate_config,
)
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.msm import PRESETS
from dreamdiff.train.pretrain import RunPlan, build_trainer, plan_run

try:  # Ray Train's internal callback API, for the placement-group workaround below: a Ray without it fails here
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
except ImportError as err:
    raise ImportError(
        f"dreamdiff.tune.sweep: Ray {ray.__version__} has no ray.train.v2._internal.execution.callback."
        "WorkerGroupCallback, which the sweep's placement-group workaround (written for Ray 2.60) uses; see the "
        "comment above _RecordPlacementGroup in dreamdiff/tune/sweep.py to update or remove it"
    ) from err

log = logging.getLogger(__name__)

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform")
FIXED_KEYS = ("output", "probe_data")  # set by the sweep, the same objective for every trial
TRIAL_DRIVER_CPUS = 0.25  # the Tune function only drives its TorchTrainer; the workers hold the real resources
MAX_CHECKED_COMBINATIONS = 4096
PLACEMENT_GROUP_FILE = ".worker_placement_group"
RESULTS_FILE = "results.csv"
PLOT_FILE = "score_vs_mask_ratio.png"
BEST_FILE = "best_pretrain.yaml"


# ------------------------------------------------------------------------------ search space


def _as_yaml(value: Any) -> str:
    """A value as apply_overrides parses it back (YAML flow style; floats keep their dot, 1.0e-05)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def trial_config(cfg: SweepConfig, overrides: dict[str, Any], output: str | Path) -> PretrainConfig:
    """The base pretrain config with a trial's overrides, its output folder and the sweep's probe.

    A `model.preset` override brings its own sizes: the base's sizes are dropped unless overridden too.
    """
    data = cfg.base.model_dump(mode="json")
    if "model.preset" in overrides:
        data["model"] = {k: v for k, v in data["model"].items() if k not in PRESETS["tiny"]}
    data.update(output=str(output), probe_data=cfg.probe_data)
    pairs = [f"{key}={_as_yaml(value)}" for key, value in overrides.items()]
    apply_overrides(data, pairs)
    return cast(PretrainConfig, validate_config("pretrain", data, f"search_space {', '.join(pairs)}"))


def _check_spec(key: str, spec: Any) -> list[Any]:
    """Values that stand for a spec when checking it: every grid/choice value; a range's bounds and middle."""
    where = f"search_space.{key}"
    if key in FIXED_KEYS:
        raise ConfigError(f"{where}: the sweep sets {key} for every trial; it cannot be searched")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"{where}: expected one of {{grid: [values]}}, {{choice: [values]}}, {{uniform: [lo, hi]}}, "
            f"{{loguniform: [lo, hi]}}; got {spec!r}"
        )
    kind, values = next(iter(spec.items()))
    if kind not in SPEC_KINDS:
        raise ConfigError(f"{where}: unknown spec kind {kind!r}; expected {', '.join(SPEC_KINDS)}")
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
        return values
    numbers = isinstance(values, list) and len(values) == 2
    if not numbers or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {kind} needs [lo, hi], two numbers; got {values!r}")
    lo, hi = values
    if lo >= hi:
        raise ConfigError(f"{where}: {kind} needs lo < hi, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs lo > 0, got {lo}")
    return [lo, (lo + hi) / 2 if kind == "uniform" else math.sqrt(lo * hi), hi]


def check_search_space(cfg: SweepConfig) -> list[PretrainConfig]:
    """Validate every search-space entry, then every combination of their values, against the pretrain config.

    Raises a one-line ConfigError naming the entry (or the combination). Returns the pretrain configs of the
    combinations checked (grid and choice values, range bounds): enough to size ASHA and the concurrency.
    """
    values = {key: _check_spec(key, spec) for key, spec in cfg.search_space.items()}
    for key, candidates in values.items():
        for value in candidates:
            trial_config(cfg, {key: value}, cfg.output)
    combos = itertools.islice(itertools.product(*values.values()), MAX_CHECKED_COMBINATIONS)
    return [trial_config(cfg, dict(zip(values, combo, strict=True)), cfg.output) for combo in combos]


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """The search space as Tune samplers, under "overrides" (dotted pretrain keys)."""
    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
    }
    overrides = {}
    for key, spec in cfg.search_space.items():
        kind, values = next(iter(spec.items()))
        overrides[key] = make[kind](values)
    return {"overrides": overrides}


# ----------------------------------------------------------------------------------- trials


# Workaround for Ray 2.60.0 (Train V2 under Tune): stopping a trial (ASHA) kills its Tune actor and, with it, its
# TorchTrainer controller, but not the placement group of its workers: Ray's PlacementGroupCleaner watches the
# controller through the State API, which a local Ray without the dashboard lacks (and the group can stay behind
# even with the dashboard). The CPUs and GPUs the group holds then starve the next trials: the sweep hangs. So each
# trial's controller writes its workers' placement group id into the trial folder (a Train WorkerGroupCallback:
# internal API, but RunConfig(callbacks=...) takes it beside the public ones), and the sweep driver removes the
# groups of trials that ended (a Tune Callback).
# Guarded: a Ray without the callback class or hook fails at import (above and below), one whose worker group no
# longer has the placement group where 2.60 keeps it fails the trial, and one that stops calling the hook fails the
# sweep as soon as a trial that trained ends with no group recorded; never a silent hang.
# To remove it once Ray frees a killed controller's workers itself (the four-trial test in tests/tune/test_sweep.py
# checks that every CPU is free after the sweep: drop the callbacks and see that it still passes): delete
# _RecordPlacementGroup, _ReapPlacementGroups, PLACEMENT_GROUP_FILE, the guarded import, and their uses in _trial
# and _tuner.
if "after_worker_group_start" not in vars(WorkerGroupCallback):
    raise ImportError(
        f"dreamdiff.tune.sweep: Ray {ray.__version__}'s WorkerGroupCallback has no after_worker_group_start hook, "
        "which the sweep's placement-group workaround (written for Ray 2.60) uses; update or remove it (see the "
        "comment above _RecordPlacementGroup in dreamdiff/tune/sweep.py)"
    )


class _RecordPlacementGroup(WorkerGroupCallback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def after_worker_group_start(self, worker_group: Any) -> None:
        try:
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        except AttributeError as err:
            raise DreamdiffError(
                f"sweep: Ray {ray.__version__} keeps a worker group's placement group elsewhere than Ray 2.60 "
                f"({err}); update the placement-group workaround in dreamdiff/tune/sweep.py"
            ) from err
        self.path.write_text(group.id.hex())


class _ReapPlacementGroups(tune.Callback):
    def __init__(self, trials_dir: Path) -> None:
        self.trials_dir = trials_dir
        self.ended: dict[str, bool] = {}  # trial id -> it reported (so its workers started)
        self.last = 0.0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = bool(trial.last_result.get("training_iteration"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = bool(trial.last_result.get("training_iteration"))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self.last > 2.0:
            self.last = time.monotonic()
            self.reap()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.reap()

    def reap(self) -> None:
        """Remove the worker placement groups of ended trials that still hold resources."""
        for trial_id, reported in list(self.ended.items()):
            path = self.trials_dir / trial_id / PLACEMENT_GROUP_FILE
            if not path.is_file():
                if reported:
                    raise DreamdiffError(
                        f"sweep: trial {trial_id} trained but no placement group was recorded in {path}: Ray "
                        f"{ray.__version__} no longer calls WorkerGroupCallback.after_worker_group_start as Ray 2.60 "
                        "did (update the workaround in dreamdiff/tune/sweep.py), or `output` is not on a filesystem "
                        "that every node shares"
                    )
                del self.ended[trial_id]
                continue
            group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(path.read_text())))
            if placement_group_table(group).get("state") not in (None, "REMOVED"):  # None: not of this Ray session
                log.info("sweep: freeing the workers of ended trial %s", trial_id)
                remove_placement_group(group)
            del self.ended[trial_id]


def _trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial, in its Tune actor: fit the pretrain TorchTrainer; its checkpoint reports go to Tune."""
    cfg = SweepConfig.model_validate(sweep)
    folder = Path(cfg.output) / "trials" / tune.get_context().get_trial_id()
    callbacks = [TuneReportCallback(), _RecordPlacementGroup(folder / PLACEMENT_GROUP_FILE)]
    build_trainer(trial_config(cfg, config["overrides"], folder), callbacks=callbacks).fit()


def _absolute(cfg: SweepConfig) -> SweepConfig:
    """Paths made absolute here: Tune runs each trial in its own working directory."""
    base = cfg.base.model_copy(
        update={
            "data": str(Path(cfg.base.data).resolve()),
            "resume_from": cfg.base.resume_from and str(Path(cfg.base.resume_from).resolve()),
            "probe_data": None,
        }
    )
    return cfg.model_copy(
        update={
            "base": base,
            "probe_data": str(Path(cfg.probe_data).resolve()),
            "output": str(Path(cfg.output).resolve()),
        }
    )


def max_concurrent_trials(cfg: SweepConfig, configs: list[PretrainConfig]) -> int:
    """The configured number, or as many trials as the cluster holds at once: each sized by the largest trial's
    ScalingConfig (workers x CPUs per worker, plus its Tune driver; GPUs when used), one CPU left to Ray Data."""
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    have = ray.cluster_resources()
    workers = max(max(1, c.scaling.num_workers) for c in configs)
    cpus = max(max(1, c.scaling.num_workers) * c.scaling.cpus_per_worker for c in configs) + TRIAL_DRIVER_CPUS
    fits = [(have.get("CPU", 0) - 1) // cpus]
    if any(c.scaling.use_gpu for c in configs):
        fits.append(have.get("GPU", 0) // workers)
    return max(1, int(min(fits)))


def _tuner(cfg: SweepConfig, configs: list[PretrainConfig], max_t: int) -> Any:
    """A new Tuner, or the one restored from <output>/tune/sweep when an earlier run of this sweep left it."""
    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep=cfg.model_dump(mode="json")), {"CPU": TRIAL_DRIVER_CPUS}
    )
    path = Path(cfg.output) / "tune" / "sweep"
    if path.exists() and tune.Tuner.can_restore(str(path)):
        print(f"sweep: resuming {path}: finished trials are kept, unfinished and failed ones continue")
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    concurrent = max_concurrent_trials(cfg, configs)
    print(f"sweep: new experiment in {path}, up to {concurrent} trial(s) at once, ASHA max_t {max_t} reports")
    scheduler = ASHAScheduler(
        time_attr="training_iteration", grace_period=cfg.grace_period, max_t=max_t, reduction_factor=2
    )
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric="probe_accuracy",
            mode="max",
            scheduler=scheduler,
            num_samples=cfg.num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name="sweep",
            storage_path=str(Path(cfg.output) / "tune"),
            callbacks=[_ReapPlacementGroups(Path(cfg.output) / "trials")],
        ),
    )


# ---------------------------------------------------------------------------------- outputs


def _plan(cfg: PretrainConfig, plans: dict[tuple, RunPlan]) -> RunPlan:
    """plan_run, once per distinct data and step-count settings (most swept keys change neither)."""
    key = (
        cfg.data,
        cfg.val_fraction,
        cfg.batch_size,
        cfg.epochs,
        cfg.scaling.num_workers,
        cfg.optim.grad_accum,
        cfg.checkpoint.every_steps,
    )
    if key not in plans:
        plans[key] = plan_run(cfg)
    return plans[key]


def _last_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1][:200] if lines else type(error).__name__


def _rows(cfg: SweepConfig, grid: Any, plans: dict[tuple, RunPlan]) -> Iterator[dict[str, Any]]:
    """One row per trial: overrides, last reported metrics, and how it ended."""
    for result in grid:
        metrics = result.metrics  # Tune fills trial_id (and config) even before a trial's first report
        overrides = result.config["overrides"]
        trial_id = metrics["trial_id"]
        trial_cfg = trial_config(cfg, overrides, Path(cfg.output) / "trials" / trial_id)
        plan = _plan(trial_cfg, plans)
        step = metrics.get("step")
        if result.error is not None:
            status = "error"
        elif step is None:
            status = "no report"
        else:
            status = "completed" if step >= plan.total_steps else "early-stopped"
        yield {
            "trial_id": trial_id,
            "status": status,
            **overrides,
            "mask_ratio": trial_cfg.model.mask_ratio,
            "encoder": f"{trial_cfg.model.embed_dim} wide x {trial_cfg.model.depth} deep",
            "probe_accuracy": metrics.get("probe_accuracy", math.nan),
            "probe_chance": metrics.get("probe_chance", math.nan),
            "val_loss": metrics.get("val_loss", math.nan),
            "step": step,
            "total_steps": plan.total_steps,
            "reports": metrics.get("training_iteration", 0),
            "samples_per_s": metrics.get("samples_per_s", math.nan),
            "wall_s": metrics.get("time_total_s", math.nan),
            "error": "" if result.error is None else _last_line(result.error),
            "config": trial_cfg,
        }


def _score(row: dict[str, Any]) -> float:
    value = row["probe_accuracy"]
    return -math.inf if value is None or math.isnan(value) else value


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial the sweep recommends: the best probe score among the trials that completed (an early-stopped
    trial was scored after fewer steps), or among all scored trials if none completed; None if none scored."""
    scored = [r for r in rows if _score(r) > -math.inf]
    completed = [r for r in scored if r["status"] == "completed"] or scored
    return max(completed, key=_score) if completed else None


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    """results.csv, best probe score first."""
    fields = list(dict.fromkeys(k for row in rows for k in row if k != "config"))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=_score, reverse=True))


def plot_scores(rows: list[dict[str, Any]], path: Path) -> None:
    """Probe score vs mask ratio, one line per encoder size through its best trial at each ratio; early-stopped
    trials hollow (their score is from an earlier rung); the constant-class floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    scored = [r for r in rows if _score(r) > -math.inf]
    for encoder in sorted({r["encoder"] for r in scored}):
        mine = [r for r in scored if r["encoder"] == encoder]
        ratios = sorted({r["mask_ratio"] for r in mine})
        best = [max(_score(r) for r in mine if r["mask_ratio"] == ratio) for ratio in ratios]
        (line,) = ax.plot(ratios, best, "-", label=encoder)
        for r in mine:
            hollow = r["status"] != "completed"
            ax.plot(r["mask_ratio"], r["probe_accuracy"], "o", color=line.get_color(), mfc="none" if hollow else None)
    chances = [r["probe_chance"] for r in scored if not math.isnan(r["probe_chance"])]
    if chances:
        ax.axhline(sorted(chances)[len(chances) // 2], color="grey", ls="--", lw=1, label="chance (majority class)")
    ax.set(
        xlabel="mask ratio",
        ylabel="probe accuracy (held-out EEG)",
        title="Linear probe vs mask ratio (hollow: stopped early)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_best(row: dict[str, Any], n_trials: int, output: Path) -> Path:
    """The best trial's full pretrain config, with a fresh output folder: `dreamdiff pretrain --config` takes it."""
    best = row["config"].model_copy(update={"output": str(output / "best-pretrain")})
    path = output / BEST_FILE
    header = (
        f"# Best of {n_trials} trial(s) of the sweep in {output}: trial {row['trial_id']} ({row['status']}), "
        f"probe_accuracy {row['probe_accuracy']:.3f} (chance {row['probe_chance']:.3f}).\n"
        f"# Train it: dreamdiff pretrain --config {path}\n"
    )
    path.write_text(header + dump_config(best))
    return path


# ------------------------------------------------------------------------------------ driver


def run(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the best trial and every trial's row. Bad entries fail before any trial."""
    from dreamdiff.ray_init import init_ray

    cfg = _absolute(cfg)
    configs = check_search_space(cfg)
    plans: dict[tuple, RunPlan] = {}
    # ASHA stops a trial once it reaches max_t: one past the longest trial's reports, so that trials end on their
    # own (and export their encoder) instead of being stopped at their last report
    max_t = max(_plan(c, plans).reports for c in configs) + 1
    output = Path(cfg.output)
    record_config(cfg, output)
    init_ray(cfg.ray)
    grid = _tuner(cfg, configs, max_t).fit()
    rows = list(_rows(cfg, grid, plans))
    if not rows:
        raise DreamdiffError(f"sweep: no trials ran; see {output / 'tune' / 'sweep'}")
    write_results(rows, output / RESULTS_FILE)
    plot_scores(rows, output / PLOT_FILE)
    failed = [r["trial_id"] for r in rows if r["status"] == "error"]
    if failed:
        log.warning("sweep: %d trial(s) failed (%s); re-run the same command to resume them", len(failed), failed)
    best = best_trial(rows)
    if best is None:
        raise DreamdiffError(f"sweep: no trial reported a probe score; see {output / RESULTS_FILE}")
    best_path = write_best(best, len(rows), output)
    print(
        f"sweep: {len(rows)} trial(s): {sum(r['status'] == 'completed' for r in rows)} completed, "
        f"{sum(r['status'] == 'early-stopped' for r in rows)} stopped early by ASHA, {len(failed)} failed; best "
        f"{best['trial_id']} probe {best['probe_accuracy']:.3f} (chance {best['probe_chance']:.3f}); "
        f"{output / RESULTS_FILE}, {output / PLOT_FILE}, {best_path}"
    )
    return {
        "best_trial": best["trial_id"],
        "best_probe_accuracy": best["probe_accuracy"],
        "best_config": str(best_path),
        "trials": [{k: v for k, v in r.items() if k != "config"} for r in rows],
    }
