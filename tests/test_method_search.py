"""The method as a searched choice (orchestrator/method_search.py), without Ray: bad choices and
sub-spaces are refused before anything runs, naming the key; a choice plans a default-setting
trial per method with that method's fixed overrides; draws pick the method first, then only that
method's keys, seeded, in bounds; child runs and the tuning report tell the methods apart."""

from __future__ import annotations

import math

import pytest

from orchestrator.plan import format_plan
from tests.test_search import hand_out
from tests.test_search import plan_of as search_plan_of
from trainers.config import ConfigError

CHOICE = "++sweep.search={method:{choice:[lora,ia3]},train.lr:{loguniform:[1.0e-4,1.0e-1]}}"


def plan_of(tmp_path, *extra):
    return search_plan_of(tmp_path, "sweep.num_samples=4", *extra)


SPACES = "++sweep.method_spaces={lora:{method.r:{choice:[2,4]}},ia3:{train.lr:{loguniform:[1.0e-2,1.0e-1]}}}"


@pytest.mark.parametrize("extra,key,fragment", [
    (["++sweep.search={method:{choice:[lora,nosuch]}}"], "sweep.search.method", "unknown method(s) nosuch"),
    (["++sweep.search={method:{uniform:[1,2]}}"], "sweep.search.method", "choice"),
    ([CHOICE, "++sweep.method_spaces={nosuch:{train.lr:{uniform:[0.1,0.2]}}}"], "sweep.method_spaces.nosuch",
     "not a method"),
    ([CHOICE, "++sweep.method_spaces={lora:[1,2]}"], "sweep.method_spaces.lora", "must map"),
    ([CHOICE, "++sweep.method_spaces={lora:{fixed:{method:ia3}}}"], "sweep.method_spaces.lora.fixed.method",
     "sweep.search.method chooses"),
    ([CHOICE, "++sweep.method_spaces={ia3:{method.r:{choice:[2,4]}}}"], "sweep.method_spaces.ia3.method.r",
     "not a config key"),
    ([CHOICE, "++sweep.method_spaces={lora:{method.r:{randint:[0,4]}}}"], "sweep.method_spaces.lora.method.r",
     "invalid trial"),
    (["++sweep.search={method:{choice:[lora,ia3]},method.r:{choice:[2,4]}}"], "sweep.search.method.r",
     "sweep.method_spaces.NAME"),  # a key of lora only, shared with ia3
    ([CHOICE, "++sweep.method_spaces={prefix:{method.num_virtual_tokens:{choice:[4,8]}}}"],
     "sweep.method_spaces.prefix", "not a method of the choice"),
    ([SPACES], "sweep.method_spaces.lora", "sweep.search.method"),  # no choice to be a space of
    (["++sweep.search={method:{choice:[lora,qlora]}}"], "sweep.search.method", "sweep.method_spaces.qlora.fixed"),
    ([CHOICE, "sweep.search_alg=hyperopt"], "sweep.search_alg", "optuna"),
    ([CHOICE, "++sweep.variants=[{method:lora}]"], "sweep.search.method", "sets the method too"),
    ([CHOICE, "sweep.num_samples=1"], "sweep.num_samples", "at least 2 trials"),
    ([CHOICE, "stage=dpo", "data=embedded_pref"], "sweep.search", "stage dpo does not"),
    # In steps every method of a choice takes the same steps; in FLOPs each takes its own.
    ([CHOICE, "++sweep.method_spaces={ia3:{fixed:{train.max_steps:20}}}"], "sweep.budget", "sweep.budget_unit=flops"),
    # 2e9 FLOPs a trial buy an IA3 step (1.5e9), not a prompt-tuning step (longer rows: 2.6e9)
    (["++sweep.search={method:{choice:[ia3,prompt]}}", "sweep.budget_unit=flops", "sweep.budget=8.0e9"],
     "sweep.budget", "do not cover one step of 'prompt'"),
    ([CHOICE, "sweep.budget_unit=flops", "sweep.budget=2.0e11", "sweep.scheduler=asha", "train.eval_every=5",
      "sweep.grace_steps=40"], "sweep.grace_steps", "no ASHA rung"),
    ([CHOICE, "sweep.budget_unit=flops", "sweep.budget=2.0e11",
      "++sweep.method_spaces={ia3:{train.max_steps:{choice:[10,20]}}}"], "sweep.budget_unit", "do not search it"),
])
def test_bad_method_choice_is_refused_naming_the_key(tmp_path, extra, key, fragment):
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, *extra)
    assert any(k == key and fragment in msg for k, msg in err.value.problems), err.value.problems


def test_method_spaces_are_refused_on_a_pipeline(tmp_path):
    from orchestrator.plan import make_plan

    with pytest.raises(ConfigError) as err:
        make_plan(["+sweep=rlhf", f"storage.path={tmp_path}", SPACES])
    assert err.value.problems[0][0] == "sweep.search"


def choice_plan(tmp_path, *extra):
    fixed = ("++sweep.method_spaces={lora:{method.r:{choice:[2,4]}},qlora:{fixed:{precision:nf4,"
             "train.optimizer:paged_adamw_8bit},method.r:{choice:[2,4]}},ia3:{train.lr:{loguniform:[1.0e-2,1.0e-1]}}}")
    return plan_of(tmp_path, "++sweep.search={method:{choice:[lora,qlora,ia3]},train.lr:{loguniform:[1.0e-4,1.0e-2]}}",
                   fixed, "sweep.num_samples=9", *extra)


def test_a_choice_plans_one_default_trial_per_method_with_its_fixed_overrides(tmp_path):
    plan = choice_plan(tmp_path)
    assert [t.label for t in plan.trials] == ["lora", "qlora", "ia3"]
    by_method = {t.cfg.method.name: t for t in plan.trials}
    assert (by_method["qlora"].cfg.precision.name, by_method["qlora"].cfg.train.optimizer) == ("nf4", "paged_adamw_8bit")
    assert by_method["lora"].cfg.precision.name == "fp32" and by_method["lora"].cfg.train.optimizer == "adamw"
    group, = plan.groups
    assert set(group.branches) == {"lora", "qlora", "ia3"} and group.defaults == plan.trials
    assert all(t.group == group.key for t in plan.trials)
    assert group.budget_steps == 9 * 30
    text = format_plan(plan)
    assert "default-setting trial per method of its choice + 6 drawn" in text
    assert "qlora (fixed precision=nf4, train.optimizer=paged_adamw_8bit)" in text


def test_under_a_flops_budget_each_method_and_each_draw_gets_its_own_steps(tmp_path):
    """Each method of the choice, and each draw (a drawn rank changes what a LoRA step costs), runs
    as many steps as a trial's share of the budget buys at its own step cost: the same compute for
    every trial of the choice. ASHA's one bracket counts FLOPs from the cheapest method's grace."""
    from orchestrator.budget import asha_settings, step_cost

    budget = 4.0e11
    plan = plan_of(tmp_path, CHOICE, "++sweep.method_spaces={lora:{method.r:{choice:[2,64]}}}",
                   "sweep.budget_unit=flops", f"sweep.budget={budget}", "sweep.num_samples=8",
                   "sweep.search_alg=random",
                   "sweep.scheduler=asha", "train.eval_every=5", "sweep.grace_steps=5")
    per_trial = budget / 8
    steps = {t.cfg.method.name: t.cfg.train.max_steps for t in plan.trials}
    assert steps["ia3"] > steps["lora"]  # an IA3 step costs less than a LoRA step
    assert f"steps at the defaults: lora {steps['lora']}, ia3 {steps['ia3']}" in format_plan(plan)
    trials, after, _, _ = hand_out(plan, tmp_path, 12)
    assert after == "FINISHED" and len(trials) == 8
    for t in trials:
        cost = step_cost(t.cfg, t.label).cost.flops  # measured on the drawn config itself
        assert per_trial - cost < t.cfg.train.max_steps * cost <= per_trial, t.label
    drawn_lora = {t.cfg.method.r: t.cfg.train.max_steps for t in trials if t.sample and t.sample["method"] == "lora"}
    assert 64 in drawn_lora and drawn_lora[64] < steps["lora"]  # rank 64 costs more than the default 8
    assert drawn_lora.get(2, steps["lora"] + 1) > steps["lora"]
    assert all(t.cfg.train.max_steps == steps["ia3"] for t in trials if t.cfg.method.name == "ia3")  # lr only
    settings = asha_settings(plan)
    cheapest = min(t.step_cost.cost.flops for t in plan.trials)
    assert plan.trials[1].step_cost.cost.flops == cheapest  # ia3, not the first method of the choice
    assert settings["time_attr"] == "perf/train_flops" and settings["grace"] == 5 * cheapest
    assert settings["horizon"] == pytest.approx(per_trial)


def test_a_tokens_budget_gives_the_methods_of_a_choice_equal_data(tmp_path):
    """tokens count data positions: LoRA and prompt tuning (its virtual tokens are not data) get the
    same steps, unlike under FLOPs, where a prompt-tuning step costs more."""
    prompt = "++sweep.search={method:{choice:[lora,prompt]}}"
    plan = plan_of(tmp_path, prompt, "sweep.budget_unit=tokens", "sweep.budget=40000")
    assert len({t.cfg.train.max_steps for t in plan.trials}) == 1
    plan = plan_of(tmp_path, prompt, "sweep.budget_unit=flops", "sweep.budget=2.0e11")
    steps = {t.cfg.method.name: t.cfg.train.max_steps for t in plan.trials}
    assert steps["prompt"] < steps["lora"]


@pytest.mark.parametrize("alg", ["random", "optuna"])
def test_draws_pick_the_method_then_its_own_keys(tmp_path, alg):
    plan = choice_plan(tmp_path, f"sweep.search_alg={alg}")
    loss = lambda t: {"eval/loss": abs(math.log10(t.cfg.train.lr) + 2.5)}  # noqa: E731  # a made-up quality
    trials, after, _, searcher = hand_out(plan, tmp_path, 12, loss)
    assert after == "FINISHED" and len(trials) == 9
    drawn = trials[3:]
    assert all(t.sample for t in drawn) and not any(t.sample for t in trials[:3])
    for t in drawn:
        method = t.sample["method"]
        assert t.cfg.method.name == method and t.label.startswith(f"{method} #")
        own = {"lora": {"method.r"}, "qlora": {"method.r"}, "ia3": set()}[method]
        assert set(t.sample) == {"method", "train.lr"} | own  # ia3 draws no rank
        low, high = (1e-2, 1e-1) if method == "ia3" else (1e-4, 1e-2)  # ia3's own range replaces the shared one
        assert low <= t.cfg.train.lr <= high
        if method == "qlora":
            assert t.cfg.precision.name == "nf4" and t.cfg.train.optimizer == "paged_adamw_8bit"
        else:
            assert t.cfg.precision.name == "fp32"
        if own:
            assert t.cfg.method.r in (2, 4)
    assert len({t.sample["method"] for t in drawn}) >= 2
    again, _, _, _ = hand_out(choice_plan(tmp_path, f"sweep.search_alg={alg}"), tmp_path, 12, loss)
    assert [t.sample for t in again] == [t.sample for t in trials]  # seeded
    tags = {trial.key: tags for trial, tags in searcher.runs.created}
    for t in trials:
        assert tags[t.key]["search_choice"] == t.cfg.method.name
        assert tags[t.key]["search_group"] == "{lora,qlora,ia3}"
        assert tags[t.key]["sample"] == ("default" if not t.sample else f"method={t.cfg.method.name} "
                                         + t.label.split(" ", 2)[2])


def test_the_tuning_report_has_a_row_per_method_of_a_choice():
    from orchestrator.cells import TrialRow
    from orchestrator.tuning import console, markdown, tunings

    def row(n, method, sample, loss):
        tags = {"search_group_key": "g1", "search_group": "{lora,ia3}", "search_choice": method, "sample": sample}
        return TrialRow(f"r{n}", "", method, "sft", "FINISHED", {}, {"eval/loss": loss}, tags, start_time=n)

    rows = [row(1, "lora", "default", 1.5), row(2, "ia3", "default", 4.0), row(3, "lora", "method=lora lr=0.01", 1.2),
            row(4, "lora", "method=lora lr=0.002", 1.4), row(5, "ia3", "method=ia3 lr=0.05", 3.0)]
    found = tunings(rows)
    assert [(t.label, len(t.trials), t.default.run_id, t.best.run_id) for t in found] == [
        ("lora", 3, "r1", "r3"), ("ia3", 2, "r2", "r5")]
    line = "method choice {lora,ia3}: best lora (method=lora lr=0.01), eval loss 1.2000; trials per method: lora 3, ia3 2"
    assert line in markdown(found) and line in console(found)


def test_a_method_the_model_cannot_take_is_left_out_of_the_choice_or_refuses_it(tmp_path):
    no_layer = "++sweep.method_spaces={lora:{fixed:{method.target_modules:[no_such_proj]}}}"
    plan = plan_of(tmp_path, CHOICE, no_layer)
    assert [t.label for t in plan.trials] == ["ia3"] and list(plan.groups[0].branches) == ["ia3"]
    assert [t.label for t in plan.skipped] == ["lora"] and "no_such_proj" in plan.skipped[0].reason
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, CHOICE, no_layer, "sweep.on_inapplicable=error")
    assert err.value.problems[0][0] == "sweep.search.method" and "no_such_proj" in err.value.problems[0][1]
