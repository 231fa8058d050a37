"""Search spaces, budgets and draws without a Ray cluster: bad spaces are refused before anything
runs, naming the key; grid axes and variants combine with the search; every searched grid point
gets the same budget; draws are seeded (the same sweep draws the same trials), stay in bounds,
follow interpolations, and an invalid draw fails as a trial of its own. Also the training loop's
periodic eval/loss that early stopping decides on."""

from __future__ import annotations

import math

import pytest

from orchestrator.plan import format_plan, make_plan
from trainers.config import ConfigError

LR = "++sweep.search={train.lr:{loguniform:[1.0e-4,1.0e-1]}}"


def plan_of(tmp_path, *extra):
    return make_plan([f"storage.path={tmp_path}", "sweep.name=tuned", "train.max_steps=30", *extra])


@pytest.mark.parametrize("extra,key,fragment", [
    (["++sweep.search={train.lr:{logunifrm:[1.0e-4,1.0e-1]}}"], "sweep.search.train.lr", "unknown distribution"),
    (["++sweep.search={train.rate:{uniform:[0.1,0.2]}}"], "sweep.search.train.rate", "not a config key"),
    (["++sweep.search={cluster.num_cpus:{choice:[1,2]}}"], "sweep.search.cluster.num_cpus", "cannot be searched"),
    (["++sweep.search={train.lr:{loguniform:[0,1.0e-1]}}"], "sweep.search.train.lr", "must be > 0"),
    (["++sweep.search={train.lr:{loguniform:[-1.0,1.0e-1]}}"], "sweep.search.train.lr", "must be > 0"),
    (["++sweep.search={train.lr:{uniform:[0.2,0.1]}}"], "sweep.search.train.lr", "low < high"),
    (["++sweep.search={method.r:{randint:[0,8]}}"], "sweep.search.method.r", "invalid trial"),
    ([LR, "sweep.num_samples=0"], "sweep.num_samples", ">= 1"),
    ([LR, "sweep.search_alg=grid"], "sweep.search_alg", "optuna"),
    ([LR, "sweep.scheduler=asha", "train.eval_every=5", "data.eval_file=null"], "data.eval_file", "eval"),
    ([LR, "sweep.scheduler=asha"], "train.eval_every", "> 0"),
    (["sweep.scheduler=asha", "train.eval_every=5"], "sweep.scheduler", "sweep.search"),
    # the searchers rank on eval/loss, which only a stage logging it during training has
    ([LR, "stage=dpo", "data=embedded_pref"], "sweep.search", "stage dpo does not"),
    ([LR, "stage=dpo", "data=embedded_pref", "sweep.scheduler=asha", "train.eval_every=5"], "sweep.scheduler",
     "stage dpo does not"),
    ([LR, "sweep.budget=10"], "sweep.budget", "train.max_steps=30"),
])
def test_bad_search_input_is_refused_naming_the_key(tmp_path, extra, key, fragment):
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, *extra)
    assert any(k == key and fragment in msg for k, msg in err.value.problems), err.value.problems


def test_grid_axes_and_variants_combine_with_search_under_equal_budgets(tmp_path):
    plan = plan_of(tmp_path, LR, "sweep.num_samples=4", "++sweep.axes={method.r:[2,8]}",
                   "++sweep.variants=[{method:lora},{method:lora,method.dropout:0.1,search:{method.dropout:{uniform:[0.0,0.2]}}}]")
    assert len(plan.groups) == 4  # 2 variants x 2 ranks, each searched on its own
    spaces = [sorted(g.space) for g in plan.groups]
    assert spaces == [["train.lr"]] * 2 + [["method.dropout", "train.lr"]] * 2
    assert {(g.num_samples, g.budget_steps) for g in plan.groups} == {(4, 120)}
    assert all(g.default.group == g.key for g in plan.groups)
    text = format_plan(plan)
    assert text.count("4 trials x 30 steps = 120 steps") == 4


def test_a_step_budget_sets_the_trials_and_unequal_budgets_are_refused(tmp_path):
    plan = plan_of(tmp_path, LR, "sweep.budget=90")
    assert plan.groups[0].num_samples == 3
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, LR, "++sweep.variants=[{method:lora},{method:ia3,train.max_steps:20}]")
    assert err.value.problems[0][0] == "sweep.budget" and "equal budgets" in err.value.problems[0][1]


FLOPS = ["sweep.budget_unit=flops", "++sweep.variants=[{method:lora},{method:full},{method:prompt}]"]


@pytest.mark.parametrize("extra,key,fragment", [
    (["sweep.budget_unit=joules", "sweep.budget=10"], "sweep.budget_unit", "steps, tokens, flops"),
    (["sweep.budget_unit=flops"], "sweep.budget", "needs sweep.budget"),
    (["sweep.budget_unit=flops", "sweep.budget=1.0e6"], "sweep.budget", "do not cover one step"),
    (["sweep.budget_unit=tokens", "sweep.budget=100"], "sweep.budget", "do not cover one step"),
    (["+sweep=rlhf", "sweep.budget_unit=flops", "sweep.budget=1.0e15"], "sweep.budget_unit", "flat sweep"),
    ([LR, "sweep.num_samples=3", "sweep.budget_unit=flops", "sweep.budget=1.0e12", "sweep.scheduler=asha",
      "train.eval_every=5", "sweep.grace_steps=500"], "sweep.grace_steps", "no ASHA rung"),
])
def test_bad_budget_input_is_refused_naming_the_key(tmp_path, extra, key, fragment):
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, *extra)
    assert any(k == key and fragment in msg for k, msg in err.value.problems), err.value.problems


def test_a_flops_budget_gives_every_method_the_same_compute(tmp_path):
    """Full fine-tuning (every weight's gradient) and prompt tuning (longer rows) cost more a step
    than LoRA, so they get fewer steps; each spends the budget within one of its steps. Costs are
    measured on the prepared data (the driver's data pass then finds it built)."""
    from trainers.flops import planned_step

    plan = plan_of(tmp_path, *FLOPS, "sweep.budget=2.0e11")
    steps = {t.cfg.method.name: t.cfg.train.max_steps for t in plan.trials}
    assert steps["full"] < steps["lora"] and steps["prompt"] < steps["lora"]
    for t in plan.trials:
        per_step = t.step_cost.cost.flops
        assert t.step_cost.source == "data" and 2.0e11 - per_step < t.cfg.train.max_steps * per_step <= 2.0e11
        assert per_step < planned_step(t.cfg).flops  # real rows are shorter than data.max_seq_len
        assert f"train.max_steps={t.cfg.train.max_steps}" in t.overrides  # in the trial's config and key
    assert (tmp_path / "prepared").is_dir()
    text = format_plan(plan)
    assert "cost from data" in text and f"{steps['full']:>6} steps x" in text


def test_a_tokens_budget_is_equal_data_and_a_flops_budget_divides_over_searched_trials(tmp_path):
    """tokens count data positions (not prompt tuning's virtual tokens): lora and prompt get the
    same steps. A searched grid point splits its budget over sweep.num_samples trials, and ASHA's
    rungs go in the budget's unit from the cheapest point's grace_steps."""
    from orchestrator.budget import asha_settings

    plan = plan_of(tmp_path, *FLOPS, "sweep.budget_unit=tokens", "sweep.budget=20000")
    steps = {t.cfg.method.name: t.cfg.train.max_steps for t in plan.trials}
    assert steps["lora"] == steps["prompt"] == steps["full"]
    plan = plan_of(tmp_path, *FLOPS, LR, "sweep.budget=3.0e11", "sweep.num_samples=3", "sweep.scheduler=asha",
                   "train.eval_every=5", "sweep.grace_steps=5")
    alone = plan_of(tmp_path, *FLOPS, "sweep.budget=1.0e11")
    assert [t.cfg.train.max_steps for t in plan.trials] == [t.cfg.train.max_steps for t in alone.trials]
    assert all(g.num_samples == 3 for g in plan.groups)
    settings = asha_settings(plan)
    cheapest = min(t.step_cost.cost.flops for t in plan.trials)
    assert settings["time_attr"] == "perf/train_flops" and settings["grace"] == 5 * cheapest
    assert settings["horizon"] == pytest.approx(1.0e11)


def test_under_a_flops_budget_a_draw_that_changes_the_step_cost_gets_its_own_steps(tmp_path):
    """A drawn rank changes what a LoRA step costs: the draw runs as many steps as the trial's share
    of the budget buys at its own cost, not the default-setting trial's steps."""
    plan = plan_of(tmp_path, "++sweep.search={method.r:{choice:[2,64]}}", "sweep.budget_unit=flops",
                   "sweep.budget=1.5e11", "sweep.num_samples=3", "sweep.search_alg=random")
    trials, after, _, _ = hand_out(plan, tmp_path, 5)
    assert after == "FINISHED" and sorted(t.cfg.method.r for t in trials) == [2, 8, 64]
    steps = {t.cfg.method.r: t.cfg.train.max_steps for t in trials}
    assert steps[2] > steps[8] > steps[64]  # the default (r=8) keeps its planned steps
    assert steps[8] == plan.trials[0].cfg.train.max_steps
    for t in trials:
        per_step = budget_cost(t)  # measured on the drawn config itself
        assert 5.0e10 - per_step < t.cfg.train.max_steps * per_step <= 5.0e10


def budget_cost(trial) -> float:
    from orchestrator.budget import step_cost

    return step_cost(trial.cfg, trial.label).cost.flops


def test_search_is_refused_on_a_pipeline(tmp_path):
    with pytest.raises(ConfigError) as err:
        make_plan(["+sweep=rlhf", f"storage.path={tmp_path}", LR])
    assert err.value.problems[0][0] == "sweep.search"


# --------------------------------------------------------------------------- draws


class Runs:
    """The child-run side of orchestrator.tracking.SweepTracker, in memory."""

    uri, git = "sqlite:///unused.db", {}

    def __init__(self):
        self.created, self.statuses = [], {}

    def create_child(self, trial, config, input_run_ids=(), tags=None):
        self.created.append((trial, tags))
        return f"run-{len(self.created)}"

    def set_status(self, run_id, status, reason=None):
        self.statuses[run_id] = (status, reason)


def hand_out(plan, tmp_path, n: int, complete=None):
    """The first `n` trials a SweepSearcher hands Tune (each completed with `complete(trial)`'s
    result at once), and what it said after them."""
    from orchestrator.scheduling import SweepSearcher

    events = []
    searcher = SweepSearcher(plan, set(), {}, Runs(), lambda *e: events.append(e), str(tmp_path))
    trials = []
    for i in range(n):
        suggestion = searcher.suggest(f"t{i}")
        if not isinstance(suggestion, dict):
            return trials, suggestion, events, searcher
        trial = searcher.live[f"t{i}"]
        trials.append(trial)
        searcher.on_trial_complete(f"t{i}", result=complete(trial) if complete else {"eval/loss": 1.0})
    return trials, searcher.suggest("last"), events, searcher


@pytest.mark.parametrize("alg", ["random", "optuna", "hyperopt"])
def test_draws_are_seeded_in_bounds_and_follow_interpolations(tmp_path, alg):
    extra = ["++sweep.search={train.lr:{loguniform:[1.0e-4,1.0e-1]},method.r:{choice:[2,4,16]}}",
             "sweep.num_samples=5", f"sweep.search_alg={alg}", "method.alpha='${mul:2,${method.r}}'"]
    plan = plan_of(tmp_path, *extra)
    # A made-up quality: the searcher is told a loss, TPE uses it.
    loss = lambda t: {"eval/loss": abs(math.log10(t.cfg.train.lr) + 2.5)}  # noqa: E731
    trials, after, _, _ = hand_out(plan, tmp_path, 10, loss)
    assert after == "FINISHED" and len(trials) == 5
    assert not trials[0].sample  # the default-setting trial first
    drawn = trials[1:]
    for t in drawn:
        assert 1e-4 <= t.cfg.train.lr <= 1e-1 and t.cfg.method.r in (2, 4, 16)
        assert t.cfg.method.alpha == 2 * t.cfg.method.r  # the interpolation follows the drawn r
        assert t.sample == {"train.lr": t.cfg.train.lr, "method.r": t.cfg.method.r}
    assert len({t.key for t in trials}) == 5
    again, _, _, _ = hand_out(plan_of(tmp_path, *extra), tmp_path, 10, loss)
    assert [t.sample for t in again] == [t.sample for t in trials]  # same seed, same draws
    other, _, _, _ = hand_out(plan_of(tmp_path, *extra, "sweep.search_seed=1"), tmp_path, 10, loss)
    assert [t.sample for t in other[1:]] != [t.sample for t in drawn]


def test_every_method_starts_from_the_same_draws(tmp_path):
    plan = plan_of(tmp_path, LR, "sweep.num_samples=3", "sweep.search_alg=random",
                   "++sweep.variants=[{method:lora},{method:ia3}]")
    trials, _, _, _ = hand_out(plan, tmp_path, 10)
    by_group = {}
    for t in trials:
        if t.sample:
            by_group.setdefault(t.group, []).append(t.sample["train.lr"])
    assert len(by_group) == 2 and len(set(map(tuple, by_group.values()))) == 1


def test_an_invalid_draw_fails_as_its_own_trial_with_the_reason(tmp_path):
    # Each value alone is valid (checked up front); both true together is not.
    plan = plan_of(tmp_path, "sweep.search_alg=random", "sweep.num_samples=9",
                   "++sweep.search={data.packing:{choice:[true,false]},data.group_by_length:{choice:[true,false]}}")
    trials, after, events, searcher = hand_out(plan, tmp_path, 20)
    failed = [(key, fields["reason"]) for event, key, fields in events if event == "error"]
    assert failed, "seed 0 draws packing=true with group_by_length=true at least once"
    assert all("data.group_by_length" in reason for _, reason in failed)
    statuses = searcher.runs.statuses.values()
    assert sum(status == "FAILED" for status, _ in statuses) == len(failed)
    assert after == "FINISHED"
    assert all(not (t.cfg.data.packing and t.cfg.data.group_by_length) for t in trials)


def test_a_small_discrete_space_stops_drawing_when_it_has_no_new_config(tmp_path):
    plan = plan_of(tmp_path, "sweep.search_alg=random", "sweep.num_samples=6",
                   "++sweep.search={method.r:{choice:[2,4]}}")
    trials, after, _, _ = hand_out(plan, tmp_path, 20)
    assert after == "FINISHED"
    assert sorted(t.cfg.method.r for t in trials) == [2, 4, 8]  # the default (r=8) and both choices, once each


# --------------------------------------------------------------------------- periodic eval


def test_eval_every_logs_eval_loss_during_training(tmp_path):
    from orchestrator.compose import compose
    from trainers.tracking import Tracker
    from trainers.trial import run_trial

    class Recording(Tracker):
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step=None):
            self.logged.append((step, dict(metrics)))

    cfg = compose(["train.max_steps=6", "train.eval_every=2", "train.log_every=3", "train.checkpoint_every=0",
                   "data.max_train_rows=32", "data.max_eval_rows=8", "train.batch_size=4"])
    tracker = Recording()
    metrics = run_trial(cfg, tmp_path / "out", tracker=tracker)
    during = [(step, m["eval/loss"]) for step, m in tracker.logged if step is not None and "eval/loss" in m]
    assert [step for step, _ in during] == [2, 4]  # not at the last step: the final evaluation covers it
    assert all(math.isfinite(v) for _, v in during)
    assert during[0][1] != during[1][1] and math.isfinite(metrics["eval/loss"])
    train_steps = [step for step, m in tracker.logged if step is not None and "train/loss" in m]
    assert train_steps == [3, 6]
    # cumulative FLOPs and tokens at every logging step and beside every evaluation (ASHA's time
    # axis with sweep.budget_unit=flops), and as a final metric
    flops = [(step, m["perf/train_flops"]) for step, m in tracker.logged
             if step is not None and "perf/train_flops" in m]
    assert [step for step, _ in flops] == [2, 3, 4, 6]
    assert all(a < b for (_, a), (_, b) in zip(flops, flops[1:])) and metrics["perf/train_flops"] == flops[-1][1]
    # every step's rows padded to their batch: at least the tokens trained on
    assert metrics["perf/train_tokens"] >= metrics["perf/tokens_per_s"] * metrics["time/train_s"] * 0.999
