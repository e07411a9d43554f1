"""Ray Tune sweeps in which every trial is a Sacred run of the same experiment.

Any medseg experiment gets a sweep with :func:`add_tune_command` and a search space: a dict
from dotted config keys (``config.lr``) to :func:`loguniform`/:func:`uniform`/:func:`choice`
specs (plain data, so the space can sit in the experiment file without importing Ray).
Each trial (a class trainable, :func:`_trial_class`) runs ``ex.run`` in a thread of its Ray
worker with the sweep's base config and the sampled values, tagged ``sweep:<name>``; so trials
land in the same database as ordinary runs. A trial hands Ray each epoch's metrics: all epoch
metrics plus the keys the SMALabeller original reported (``training_loss``,
``validation_loss``, ``epoch``). When the scheduler stops a trial, its run is told to stop after
that epoch, notes why and when in its info, and ends COMPLETED before Ray stops the worker.
(``do2dTraining(ray_tune=True)`` inside a user's own function trainable reports through
``ray.tune.report``, where a stop arrives as ``SystemExit``.)

Ray is imported only when a sweep runs: ``medseg`` and every experiment import without it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.engine.trainer import Callback, Trainer
from medseg.errors import ConfigError, MedsegError, describe

log = logging.getLogger(__name__)

#: How long a stopped trial's worker waits for its run to finish before it exits.
FINISH_TIMEOUT_S = 120.0
#: How long the sweep, once every trial has finished, waits for their runs to end.
SWEEP_END_TIMEOUT_S = 30.0
#: The folder that holds experiments/ and ingredients/ (trials import experiments.<name>).
REPOSITORY = Path(__file__).resolve().parents[1]

TUNE_FIELDS = {
    "num_samples": Field(20, c.integer(minimum=1), "Trials to run"),
    "scheduler": Field("asha", c.choice("asha", "none"),
                       "'asha' (stops poor trials early) or 'none'"),
    "max_t": Field(10, c.integer(minimum=1), "ASHA: most epochs of a trial"),
    "grace_period": Field(1, c.integer(minimum=1), "ASHA: epochs before a trial can be stopped"),
    "reduction_factor": Field(2, c.integer(minimum=2), "ASHA: halving rate"),
    "search": Field("optuna", c.choice("optuna", "random"),
                    "'optuna' (OptunaSearch, as the original) or 'random'"),
    "metric": Field("validation_loss", c.text(), "Reported metric the sweep optimises"),
    "mode": Field("min", c.choice("min", "max"), "Whether the metric improves downwards"),
    "cpus_per_trial": Field(1, c.number(above=0), "CPUs Ray reserves per trial"),
    "gpus_per_trial": Field(0, c.number(minimum=0), "GPUs Ray reserves per trial"),
    "max_concurrent": Field(0, c.integer(minimum=0), "Trials at once (0: as resources allow)"),
    "name": Field("{experiment}-sweep", c.text(), "Sweep name ({experiment} is filled in)"),
    "storage_path": Field("~/ray_results", c.text(), "Ray's result folder"),
    "space": Field({}, c.mapping_of(c.sequence(c.text(), min_length=1)),
                   "Search space, nested like the config (tune.space.config.lr=...): "
                   "['loguniform', low, high], ['uniform', low, high] or ['choice', [options]]"),
}
SPECS = ("loguniform", "uniform", "choice")


def loguniform(low: float, high: float) -> list:
    return ["loguniform", low, high]


def uniform(low: float, high: float) -> list:
    return ["uniform", low, high]


def choice(*options: Any) -> list:
    return ["choice", list(options)]


def search_space(space):
    """``tune.space``, as the run's config has it."""
    return space


class TuneIngredient(FieldIngredient):
    """``tune``: the sweep's settings; ``space`` is the experiment's search space."""

    open_entries = ("space",)

    def __init__(self, **defaults: Any) -> None:
        # The space's values mix strings and numbers; it is checked by check_space instead.
        fields = dict(TUNE_FIELDS)
        fields["space"] = Field(fields["space"].default, c.Check("a mapping",
                                                                 lambda v: isinstance(v, Mapping)),
                                fields["space"].doc)
        super().__init__("tune", fields, defaults)

        # Sacred accepts new keys below a captured function's argument, so a user can add
        # entries to the space (they are checked by check_space before the sweep starts).
        self.search_space = self.captured(search_space)


def flat_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"config": {"lr": spec}}`` -> ``{"config.lr": spec}``."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, Mapping):
            flat.update(flat_space(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_space(space: Mapping[str, Any], known_entries) -> None:
    """Each search-space key must be a config entry, each value a spec of :data:`SPECS`."""
    known = set(known_entries)
    space = flat_space(space)
    if not space:
        raise ConfigError("tune.space is empty; give at least one entry to search")
    for key, spec in space.items():
        if key not in known or key.startswith("tune."):
            raise ConfigError(f"tune.space entry {key!r} is not a config entry of this "
                              "experiment; `print_config` lists them")
        well_formed = (isinstance(spec, (list, tuple)) and spec and spec[0] in SPECS
                       and (len(spec) == 3 if spec[0] != "choice"
                            else len(spec) == 2 and isinstance(spec[1], (list, tuple))))
        if not well_formed:
            raise ConfigError(f"tune.space[{key!r}] must be ['loguniform', low, high], "
                              f"['uniform', low, high] or ['choice', [options]], got {spec!r}")


def _ray_space(space: Mapping[str, Any]) -> dict:
    from ray import tune

    build = {"loguniform": tune.loguniform, "uniform": tune.uniform,
             "choice": lambda options: tune.choice(options)}
    return {key: _ray_space(value) if isinstance(value, Mapping) else build[value[0]](*value[1:])
            for key, value in space.items()}


def _merge(base: dict, updates: Mapping) -> dict:
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------- inside a trial
_TRIAL: dict[str, Any] = {}


@contextlib.contextmanager
def reporting_to_tune(enabled: bool = True) -> Iterator[None]:
    """Runs started inside report each epoch to Ray Tune (``do2dTraining(ray_tune=True)``)."""
    previous = _TRIAL.get("active", False)
    _TRIAL["active"] = bool(enabled) or previous
    try:
        yield
    finally:
        _TRIAL["active"] = previous


def trial_callbacks(reporter=None) -> list[Callback]:
    """The callbacks a training run adds when it is a trial of a sweep (none otherwise)."""
    return [TuneReport(reporter)] if _TRIAL.get("active") else []


class TuneReport(Callback):
    """Reports each epoch's metrics to Ray Tune; a stop from the scheduler ends training after
    this epoch and is noted in the run's info (``stopped_by_scheduler``)."""

    def __init__(self, reporter=None) -> None:
        self.reporter = reporter

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics) -> None:
        from ray import tune

        report = {name: float(value) for name, value in metrics.items()}
        report.update(epoch=epoch, training_loss=float(metrics.get("train_loss_epoch", "nan")),
                      validation_loss=float(metrics.get("val_loss", "nan")))
        channel = _TRIAL.get("channel")
        if channel is not None:  # a trial of run_sweep (SacredTrial)
            stopped = not channel.report(report)
        else:  # do2dTraining(ray_tune=True) inside a user's own function trainable
            try:
                tune.report(report)
                stopped = False
            except SystemExit:
                stopped = True
        if stopped:
            if epoch >= trainer.settings.num_epochs:
                return  # the scheduler's stop at the last epoch ends nothing early
            reason = f"stopped by the sweep's scheduler after epoch {epoch}"
            trainer.stop_reason = reason
            _TRIAL["stopped"] = {"epoch": epoch, "reason": reason,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            reporter = self.reporter or trainer.reporter
            reporter.set_info("stopped_by_scheduler", _TRIAL["stopped"])


class _EpochChannel:
    """Between a trial's Sacred run (in its own thread) and Ray's calls to the trial: one
    epoch's metrics at a time, and whether the trial is to go on."""

    def __init__(self) -> None:
        self.results: queue.Queue = queue.Queue()
        self.proceed = threading.Semaphore(0)
        self.stopping = threading.Event()

    def report(self, metrics: dict) -> bool:
        """Hand one epoch's metrics to Ray and wait for its decision: False to stop."""
        self.results.put(("result", metrics))
        self.proceed.acquire()
        return not self.stopping.is_set()


def _trial_class():
    """A Ray Tune class trainable whose trial is one Sacred run of the experiment.

    Why a class and not a function: Tune stops a function trial's worker right after its
    stop decision, and the run's thread then never finished (its Sacred record stayed
    RUNNING; an atexit wait did not help: the thread no longer ran once Ray's worker had shut
    down). A class trainable's ``cleanup`` runs in the worker before it is stopped: it tells
    the run to end after the current epoch and waits until it has recorded its end."""
    from ray import tune

    # Ray pickles this class by value, with copies of the globals it uses: the trial's state
    # must be that of the module the experiment's callbacks import, so it is reached through it.
    own = __name__

    class SacredTrial(tune.Trainable):
        def setup(self, config, module=None, base_updates=None, named_configs=(), tags=(),
                  runs=None) -> None:
            import ray

            self.state = importlib.import_module(own)
            self.channel = self.state._EpochChannel()
            self.waiting = False
            self.last: dict = {}
            self.runs, self.key = runs, uuid.uuid4().hex
            if runs is not None:
                ray.get(runs.started.remote(self.key))
            updates = self.state._merge(base_updates or {}, config)
            updates["tags"] = list(updates.get("tags", [])) + list(tags)
            self.thread = threading.Thread(target=self._run, daemon=True,
                                           args=(module, updates, list(named_configs)))
            self.thread.start()

        def _run(self, module, updates, named_configs) -> None:
            import ray

            outcome = ("done", None)
            try:
                experiment = importlib.import_module(module).ex
                self.state._TRIAL["channel"] = self.channel
                with self.state.reporting_to_tune():
                    experiment.run(config_updates=updates, named_configs=named_configs)
            except BaseException as error:  # handed to Ray by step()
                outcome = ("error", error)
            finally:
                self.state._TRIAL.pop("channel", None)
                if self.runs is not None:
                    ray.get(self.runs.ended.remote(self.key), timeout=30)
                self.channel.results.put(outcome)

        def step(self):
            if self.waiting:
                self.waiting = False
                self.channel.proceed.release()
            kind, value = self.channel.results.get()
            if kind == "result":
                self.waiting, self.last = True, value
                return dict(value)
            if kind == "error":
                raise value
            return {**self.last, "done": True}  # the run ended by itself (epochs, patience)

        def save_checkpoint(self, checkpoint_dir):
            return None  # the run writes its own checkpoints (checkpoint.resume continues one)

        def load_checkpoint(self, checkpoint) -> None:
            pass

        def cleanup(self) -> None:
            self.channel.stopping.set()
            if self.waiting:
                self.waiting = False
                self.channel.proceed.release()
            self.thread.join(self.state.FINISH_TIMEOUT_S)

    return SacredTrial


def _trial_runs():
    """A Ray actor that counts the trials' Sacred runs still going (works across nodes, where
    a marker file would not)."""
    import ray

    @ray.remote(num_cpus=0)
    class TrialRuns:
        def __init__(self) -> None:
            self.running: set[str] = set()

        def started(self, key: str) -> None:
            self.running.add(key)

        def ended(self, key: str) -> None:
            self.running.discard(key)

        def count(self) -> int:
            return len(self.running)

    return TrialRuns.remote()


def _wait_for_trial_runs(runs, num_samples: int):
    """A Tune callback that, once every trial has finished, waits until their Sacred runs have
    ended (at most :data:`SWEEP_END_TIMEOUT_S`).

    Why: Tune marks a trial TERMINATED as soon as it decides to stop it (ASHA's stop, or
    ``max_t`` reached) and stops its worker in the background; at the end of the sweep it
    gives a stopping worker 10 s (a constant of Ray's TuneController) before killing it. A
    trial's run still has to finish its epoch, restore the best model and write its
    checkpoints and record; on a loaded machine that takes longer, and the killed runs stayed
    RUNNING without metrics (the intermittent sweep test). Waiting in ``on_step_end`` lets
    every stop already scheduled proceed while the end-of-sweep cleanup waits."""
    import ray
    from ray import tune

    class WaitForTrialRuns(tune.Callback):
        def on_step_end(self, iteration, trials, **info) -> None:
            if len(trials) < num_samples or not all(t.is_finished() for t in trials):
                return
            deadline = time.monotonic() + SWEEP_END_TIMEOUT_S
            while ray.get(runs.count.remote()) and time.monotonic() < deadline:
                time.sleep(0.2)

    return WaitForTrialRuns()


def _absolute_paths(config: Mapping[str, Any], keys) -> dict:
    return {key: str(Path(config[key]).expanduser().resolve()) for key in keys
            if isinstance(config.get(key), str)}


#: Attempts at starting the local Ray node.
RAY_START_ATTEMPTS = 3


def start_ray() -> None:
    """``ray.init`` of a local node, retried when the node times out during startup.

    Why: the raylet gives Ray's dashboard/metrics agent a fixed 15 s to write its port file
    and then exits (ray-project/ray#65983; the driver then reports "The current node timed
    out during startup"). On a machine whose cores are all busy (a full test suite on two
    cores) the agent's Python start-up alone takes longer; a second attempt usually finds
    the imports in the page cache."""
    import ray

    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            return
        except Exception as error:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(error) or attempt == RAY_START_ATTEMPTS:
                raise
            log.warning("Ray's node timed out during startup (attempt %d of %d); retrying",
                        attempt, RAY_START_ATTEMPTS)
            ray.shutdown()


def run_sweep(ex, module: str, config: Mapping[str, Any], *, named_configs=(),
              path_keys=()) -> dict[str, Any]:
    """Run the sweep of the ``tune`` settings in ``config`` over ``tune.space``; return the
    best trial's sampled config and metric. ``path_keys``: top-level entries holding paths
    (made absolute: trials run in Ray workers)."""
    settings = config["tune"]
    space = settings["space"]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    import ray
    from ray import tune

    name = settings["name"].format(experiment=ex.path)
    base = {key: value for key, value in config.items()
            if key not in ("tune", "seed") and not key.startswith("_")}
    base.update(_absolute_paths(config, path_keys))
    tracking = dict(base.get("tracking", {}))
    if tracking.get("file_dir"):
        tracking["file_dir"] = str(Path(tracking["file_dir"]).resolve())
        base["tracking"] = tracking
    scheduler = None
    if settings["scheduler"] == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="epoch", max_t=settings["max_t"],
                                  grace_period=settings["grace_period"],
                                  reduction_factor=settings["reduction_factor"], brackets=1)
    search = None
    if settings["search"] == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch()
    if settings["max_concurrent"]:
        from ray.tune.search import ConcurrencyLimiter

        search = ConcurrencyLimiter(search or tune.search.BasicVariantGenerator(),
                                    max_concurrent=settings["max_concurrent"])
    if not ray.is_initialized():
        # Workers inherit the environment of the node started here: the import path of this
        # process (experiments/ and the repository) and the cwd-keeping switch.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            dict.fromkeys([str(REPOSITORY), os.getcwd(), *[p for p in sys.path if p],
                           *os.environ.get("PYTHONPATH", "").split(os.pathsep)]))
        start_ray()
    runs = _trial_runs()
    trainable = tune.with_resources(
        tune.with_parameters(_trial_class(), module=module, base_updates=base,
                             named_configs=list(named_configs), tags=[f"sweep:{name}"],
                             runs=runs),
        {"cpu": settings["cpus_per_trial"], "gpu": settings["gpus_per_trial"]})
    tuner = tune.Tuner(
        trainable, param_space=_ray_space(space),
        tune_config=tune.TuneConfig(metric=settings["metric"], mode=settings["mode"],
                                    num_samples=settings["num_samples"], search_alg=search,
                                    scheduler=scheduler, reuse_actors=False),
        run_config=tune.RunConfig(name=name,
                                  storage_path=str(Path(settings["storage_path"]).expanduser()
                                                   .resolve()),
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[_wait_for_trial_runs(runs, settings["num_samples"])]))
    started = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - started
    if all(result.error for result in results):
        raise MedsegError(f"every trial of sweep {name} failed; the first: "
                          f"{describe(results[0].error)}")
    best = results.get_best_result(metric=settings["metric"], mode=settings["mode"])
    trials = []
    for result in results:
        frame = result.metrics_dataframe
        trials.append({"config": result.config,
                       "epochs": int(frame["epoch"].max())
                       if frame is not None and "epoch" in frame else 0,
                       settings["metric"]: (result.metrics or {}).get(settings["metric"]),
                       "error": str(result.error) if result.error else None})
    stopped = sum(1 for t in trials if t["epochs"] < settings["max_t"] and not t["error"])
    return {"name": name, "best_config": best.config,
            "best_metric": (best.metrics or {}).get(settings["metric"]),
            "metric": settings["metric"], "trials": trials, "wall_time_s": wall,
            "searcher": type(getattr(search, "searcher", search)).__name__ if search else
            "BasicVariantGenerator",
            "trials_ended_before_max_t": stopped}


def add_tune_command(ex, module: str, *, path_keys=()) -> None:
    """Give ``ex`` (which has a :class:`TuneIngredient`) a ``tune`` command; the search space
    is checked before the command's run starts."""

    @ex.config_validator
    def check_tune(config, command_name):
        if command_name == "tune":
            check_space(config["tune"]["space"], ex.known_entries())

    @ex.command
    def tune(_run, _config):
        """Ray Tune sweep: every trial a Sacred run tagged sweep:<name>; prints the best."""
        summary = run_sweep(ex, module, _config, path_keys=path_keys)
        print(f"sweep {summary['name']}: best {summary['metric']}={summary['best_metric']} "
              f"with {summary['best_config']} ({len(summary['trials'])} trials, "
              f"{summary['wall_time_s']:.0f} s)")
        _run.info["sweep"] = summary
        return {"best_config": summary["best_config"], "best_metric": summary["best_metric"]}

    return tune
