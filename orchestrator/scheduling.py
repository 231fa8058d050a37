"""What one Ray Tune run of a whole sweep is driven by: a Tune Searcher that hands Tune the next
trial whose inputs are FINISHED (no waves: a pipeline stage starts when its own upstream trials
end, whatever else is running), and draws the searched trials of each grid point; and a
scheduler that runs one ASHA per searched grid point (each method is compared with itself, or,
in a method choice, the choice's methods with each other: orchestrator/method_search.py).

Tune asks `suggest` whenever it has room (cluster.max_concurrent_trials, via its
ConcurrencyLimiter); None means "nothing ready yet, ask again", FINISHED ends the run once the
running trials end. A trial's MLflow child run is created when it is handed to Tune, so its start
and end times are when it ran; a failure skips everything downstream (KILLED + `skip_reason`).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from orchestrator import memcap, method_search, search
from orchestrator.dag import PipelineState
from orchestrator.trials import Plan, SearchGroup, Trial, trial_key
from trainers.config import ConfigError
from trainers.storage import join, remove

log = logging.getLogger("orchestrator")
DRAW_RETRIES = 20  # a small discrete space may have no new config left; then the point stops drawing


class GroupDraws:
    """The trials still to draw for one searched grid point, and its searcher."""

    def __init__(self, group: SearchGroup, sweep, finished: int):
        self.group = group
        self.left = group.num_samples - len(group.defaults) - finished  # its default-setting trials count
        self.number = finished
        self.searcher = search.make_searcher(sweep.search_alg, method_search.searcher_space(group), sweep.search_seed)
        # The same seed for every point: with equal spaces, each method starts from the same draws.
        self.rng = random.Random(sweep.search_seed)
        self.inner_ids: dict[str, str] = {}  # Tune trial id -> id its searcher knows the draw by
        self.asked = 0

    def draw(self, trial_id: str) -> dict[str, Any] | None:
        if self.searcher is None:
            return method_search.draw_random(self.group, self.rng)
        self.asked += 1
        inner = f"{trial_id}-{self.asked}"
        sample = self.searcher.suggest(inner)
        if sample in (None, Searcher.FINISHED):
            return None
        self.inner_ids[trial_id] = inner
        return method_search.sample_of(self.group, sample)

    def told(self, trial_id: str, result: dict | None, error: bool) -> None:
        inner = self.inner_ids.pop(trial_id, None)
        if self.searcher is not None and inner is not None:
            self.searcher.on_trial_complete(inner, result=result, error=error)


class SweepSearcher(Searcher):
    """Hands Tune each ready trial of the plan, then each searched grid point's draws.

    `done`: keys of trials finished in an earlier run of the same sweep (kept, not rerun);
    `run_ids`: trial key -> the child run it already has (a resumed sweep; new ones are added);
    `runs` creates and ends child runs (orchestrator.tracking.SweepTracker); `send(event, key,
    fields)` tells the driver what happened ("created", "skipped", "error"); `finished_samples`:
    searched grid point key -> its drawn trials among `done`.
    """

    def __init__(self, plan: Plan, done: set[str], run_ids: dict[str, str], runs, send: Callable,
                 storage: str, finished_samples: dict[str, int] | None = None):
        super().__init__()  # no metric of its own: Tune would then demand it in every progress report
        self.plan, self.runs, self.send, self.storage, self.run_ids = plan, runs, send, storage, run_ids
        self.by_key = {t.key: t for t in plan.trials}
        self.inputs_envs: dict[tuple, dict[str, str]] = {}  # see inputs_environment
        self.state = PipelineState([t.key for t in plan.trials], {t.key: t.after for t in plan.trials},
                                   {t.key: t.label for t in plan.trials}, done=set(self.by_key) & set(done))
        self.draws = [GroupDraws(g, plan.base.sweep, (finished_samples or {}).get(g.key, 0)) for g in plan.groups]
        # Keys handed out or kept. A draw may repeat an unfinished trial of an earlier run: it resumes.
        self.used = set(self.by_key) | set(done)
        self.live: dict[str, Trial] = {}  # Tune trial id -> trial

    @property
    def total(self) -> int:
        """Most trials Tune will be handed."""
        return sum(s == "PENDING" for s in self.state.states.values()) + sum(max(0, d.left) for d in self.draws)

    def suggest(self, trial_id: str) -> dict | str | None:
        ready = self.state.ready()
        trial = self.by_key[ready[0]] if ready else self._draw(trial_id)
        if trial is None:
            idle = not self.live and not self.state.ready() and not any(d.left > 0 for d in self.draws)
            return Searcher.FINISHED if idle else None
        if trial.key in self.state.states:
            self.state.start(trial.key)
        self.live[trial_id] = trial
        return {"trial": self.spec(trial)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self.live.pop(trial_id, None)
        if trial is None:
            return
        for draws in self.draws:
            if draws.group.key == trial.group and trial.sample:
                draws.told(trial_id, result, error)
        if trial.key not in self.state.states:
            return
        if not error:
            self.state.finish(trial.key)
            return
        for key, reason in self.state.fail(trial.key).items():
            self.runs.skip(self.child_run(self.by_key[key]), reason)
            self.send("skipped", key, {"reason": reason})

    def _draw(self, trial_id: str) -> Trial | None:
        """The next drawn trial of the first grid point with draws left; a draw whose config is
        invalid, or estimated over sweep.memory_limit, fails as a trial of its own (its child run
        says why) and the next one is drawn."""
        for draws in self.draws:
            while draws.left > 0:
                drawn = self._new_sample(draws, trial_id)
                if drawn is None:
                    draws.left = 0  # the space has no new config (or the searcher is done)
                    break
                draws.left -= 1
                draws.number += 1
                trial, error = self._sampled_trial(draws, drawn)
                if error is None:
                    return trial
                draws.told(trial_id, None, True)
                run_id = self.child_run(trial)
                self.runs.set_status(run_id, "FAILED", error)
                self.send("error", trial.key, {"reason": error})
        return None

    def _new_sample(self, draws: GroupDraws, trial_id: str) -> tuple[dict, str] | None:
        """(sample, key) of a config not in this sweep yet, or None."""
        for _ in range(DRAW_RETRIES):
            sample = draws.draw(trial_id)
            if sample is None:
                return None
            try:
                key = trial_key(method_search.config_of(draws.group, sample))
            except ConfigError:
                return sample, ""  # _sampled_trial reports it
            if key not in self.used:
                return sample, key
            draws.told(trial_id, None, True)  # a repeat: the searcher learns nothing from it
        return None

    def _sampled_trial(self, draws: GroupDraws, drawn: tuple[dict, str]) -> tuple[Trial, str | None]:
        sample, key = drawn
        group = draws.group
        default = method_search.base_of(group, sample)[0]  # its method's default-setting trial
        label = method_search.label_of(group, draws.number, sample)
        try:
            cfg = method_search.config_of(group, sample)
            # What `data.template=auto` resolved to: the plan's input check did it for the
            # default-setting trial (orchestrator/__main__.py), and a draw has the same data.
            cfg.data.template = default.cfg.data.template
            error = memcap.draw_refusal(cfg, self.plan.base.sweep)  # a larger drawn rank or batch
        except ConfigError as err:
            cfg, error = default.cfg, "invalid draw: " + "; ".join(f"{k}: {m}" for k, m in err.problems)
            key = trial_key(cfg) + f"-draw{draws.number}"
        self.used.add(key)
        trial = Trial(key=key, label=label, overrides=[f"{k}={v}" for k, v in sample.items()], cfg=cfg,
                      resources=default.resources, group=group.key, sample=sample,
                      estimated_bytes=default.estimated_bytes)
        return trial, error

    def child_run(self, trial: Trial) -> str:
        """The trial's child run: the one it has (a resumed sweep), else a new one, created now."""
        if trial.key not in self.run_ids:
            # A new run must not resume checkpoints some earlier sweep left under the same key.
            remove(join(self.storage, self.plan.experiment, trial.key, "checkpoints"))
            tags = {}
            group = next((g for g in self.plan.groups if g.key == trial.group), None)
            if group is not None:
                tags = {"search_group": group.label, "search_group_key": group.key,
                        "sample": search.describe(trial.sample) if trial.sample else "default",
                        **method_search.run_tags(group, trial)}
            self.run_ids[trial.key] = self.runs.create_child(trial, trial.config, [self.run_ids[k] for k in trial.after],
                                                             tags)
            self.send("created", trial.key, {"run_id": self.run_ids[trial.key], "label": trial.label})
        return self.run_ids[trial.key]

    def inputs_environment(self, cfg) -> dict[str, str]:
        """The env.* tags of a trial's inputs (data, template, base weights), computed once per sweep
        for all the trials that share them instead of once in every trial's worker."""
        from trainers.trial import inputs_environment

        key = (cfg.data.train_file, cfg.data.eval_file, cfg.data.template, cfg.model.name_or_path, cfg.model.revision)
        if key not in self.inputs_envs:
            self.inputs_envs[key] = inputs_environment(cfg)
        return self.inputs_envs[key]

    def spec(self, trial: Trial) -> dict:
        """What the Tune trial function gets (orchestrator.runner.tune_trial)."""
        return {
            "key": trial.key,
            "cfg": trial.config,
            "run_id": self.child_run(trial),
            "tracking_uri": self.runs.uri,
            "output_dir": join(self.storage, self.plan.experiment, trial.key),
            "ray_storage": join(self.storage, "ray"),
            "prepared_dir": join(self.storage, "prepared"),  # the driver's data pass wrote it (orchestrator/prepare.py)
            "resources": trial.resources,
            "max_failures": self.plan.base.cluster.max_failures,
            "git": self.runs.git,  # a resumed trial may run newer code than its run was created with
            "inputs_env": self.inputs_environment(trial.cfg),
            "group": trial.group,
            "drawn": bool(trial.sample),
        }


class PerGroupASHA(FIFOScheduler):
    """ASHA on eval/loss among the drawn trials of one grid point at a time; other trials run to
    the end. The time axis is `time_attr`: the steps (`progress/step`, sweep.budget_unit=steps),
    whose horizon (max_t) is one past train.max_steps so that a trial is never stopped for having
    reached its last step (it still evaluates and saves); or the cumulative tokens or FLOPs the
    worker reports (orchestrator/budget.py), whose `horizon` is a trial's budget, which its planned
    steps do not pass."""

    def __init__(self, grace: float, reduction_factor: int, time_attr: str = "progress/step",
                 horizon: float | None = None):
        super().__init__()
        self.grace, self.reduction_factor, self.time_attr, self.horizon = grace, reduction_factor, time_attr, horizon
        self.groups: dict[str, AsyncHyperBandScheduler] = {}

    def _asha(self, trial) -> AsyncHyperBandScheduler | None:
        spec = trial.config["trial"]
        if not spec.get("drawn"):
            return None
        if spec["group"] not in self.groups:
            self.groups[spec["group"]] = AsyncHyperBandScheduler(
                time_attr=self.time_attr, metric=search.METRIC, mode=search.MODE,
                max_t=self.horizon or spec["cfg"]["train"]["max_steps"] + 1, grace_period=self.grace,
                reduction_factor=self.reduction_factor, brackets=1)
        return self.groups[spec["group"]]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # its metric is fixed: eval/loss, minimised

    def on_trial_add(self, tune_controller, trial) -> None:
        asha = self._asha(trial)
        if asha is not None:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        asha = self._asha(trial)
        return asha.on_trial_result(tune_controller, trial, result) if asha else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        asha = self._asha(trial)
        if asha is not None:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        asha = self._asha(trial)
        if asha is not None:
            asha.on_trial_remove(tune_controller, trial)
