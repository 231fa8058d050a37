"""Pipelines of stages without Ray: expansion into trials, one shared upstream trial, keys that
follow their upstream, topological order, skip propagation, and the order in which the sweep's
Tune searcher (orchestrator/scheduling.py) hands trials out as their inputs finish."""

from __future__ import annotations

import io

import pytest

from orchestrator import dag
from orchestrator.plan import GROUPS, expand, make_plan
from trainers.config import ConfigError

RLHF = {
    "sft": {"overrides": {"train.max_steps": 5}},
    "reward": {"after": ["sft"], "overrides": {"data": "embedded_pref"}},
    "rl": {"after": ["sft", "reward"], "axes": {"method.r": [4, 16]}},
    "dpo": {"after": ["sft"]},
}


def nodes_of(stages: dict, seeds=(0,)):
    return dag.expand_pipeline(dag.parse_stages(stages), list(seeds), expand, GROUPS)


def test_stages_expand_into_trials_sharing_one_upstream_run():
    nodes = nodes_of(RLHF)
    assert [n.label for n in nodes] == ["sft", "reward", "rl r=4", "rl r=16", "dpo"]
    sft, reward, rl4, rl16, dpo = nodes
    assert rl4.upstream == rl16.upstream == {"sft": 0, "reward": 1}  # one sft and one reward run for both
    assert reward.upstream == dpo.upstream == {"sft": 0}
    assert rl4.own == [("method.r", 4)] and sft.own == []


def test_order_is_topological_whatever_the_declaration_order():
    stages = {"rl": {"after": ["reward"]}, "reward": {"after": ["sft"]}, "dpo": {"after": ["sft"]}, "sft": {}}
    assert [s.name for s in dag.parse_stages(stages)] == ["sft", "reward", "rl", "dpo"]


def test_downstream_trials_pair_upstream_trials_of_the_same_lineage():
    stages = {"sft": {"axes": {"train.lr": [0.1, 0.2]}}, "reward": {"after": ["sft"]},
              "rl": {"after": ["sft", "reward"]}}
    nodes = nodes_of(stages)
    rl = [n for n in nodes if n.stage == "rl"]
    assert len(rl) == 2  # not 2 x 2: each rl takes the reward run built on its own sft run
    for node in rl:
        assert nodes[node.upstream["reward"]].upstream["sft"] == node.upstream["sft"]
    assert [n.label for n in rl] == ["rl [sft lr=0.1] [reward [sft lr=0.1]]", "rl [sft lr=0.2] [reward [sft lr=0.2]]"]


def test_seeds_replicate_the_whole_pipeline():
    nodes = nodes_of({"sft": {}, "dpo": {"after": ["sft"]}}, seeds=(0, 1))
    assert [(n.label, n.seed) for n in nodes] == [("sft seed=0", 0), ("dpo seed=0", 0), ("sft seed=1", 1),
                                                  ("dpo seed=1", 1)]
    assert nodes[3].upstream == {"sft": 2}


@pytest.mark.parametrize("stages,key,fragment", [
    ({"a": {"after": ["b"]}, "b": {"after": ["a"]}}, "sweep.stages", "cycle"),
    ({"a": {"after": ["nope"]}}, "sweep.stages.a.after", "no stage named 'nope'"),
    ({"a": {"axis": {}}}, "sweep.stages.a.axis", "unknown key"),
    ({"a": {"axes": {"method.r": []}}}, "sweep.stages.a.axes.method.r", "non-empty list"),
])
def test_bad_stage_blocks_name_the_key(stages, key, fragment):
    with pytest.raises(ConfigError) as err:
        dag.parse_stages(stages)
    (problem_key, message), = err.value.problems
    assert problem_key == key and fragment in message


def test_inputs_go_to_the_field_that_takes_what_the_upstream_produces():
    fields = {"init_from": "policy", "reward_from": "reward_model"}
    assert dag.assign_inputs("rl", "rl", fields, {"sft": "policy", "reward": "reward_model"}) == {
        "init_from": "sft", "reward_from": "reward"}
    with pytest.raises(ConfigError, match="does not take"):
        dag.assign_inputs("sft2", "sft", {"init_from": "policy"}, {"reward": "reward_model"})
    with pytest.raises(ConfigError, match="both fill stage.init_from"):
        dag.assign_inputs("dpo", "dpo", fields, {"a": "policy", "b": "policy"})


def test_a_failure_skips_everything_downstream_and_nothing_else():
    after = {"sft": [], "reward": ["sft"], "rl": ["sft", "reward"], "dpo": ["sft"], "other": []}
    state = dag.PipelineState(list(after), after, {k: k.upper() for k in after})
    assert state.ready() == ["sft", "other"]
    state.start("sft"), state.start("other")
    state.finish("sft")
    assert state.ready() == ["reward", "dpo"]
    state.start("reward"), state.start("dpo")
    assert state.fail("reward", "boom") == {"rl": "upstream REWARD failed"}
    state.finish("dpo"), state.finish("other")
    assert state.ready() == [] and state.finished
    assert state.states == {"sft": "FINISHED", "reward": "FAILED", "rl": "SKIPPED", "dpo": "FINISHED",
                            "other": "FINISHED"}


def test_a_root_failure_names_itself_in_every_transitive_skip():
    after = {"sft": [], "reward": ["sft"], "rl": ["reward"]}
    state = dag.PipelineState(list(after), after, {"sft": "sft lr=1"})
    state.start("sft")
    assert state.fail("sft") == {"reward": "upstream sft lr=1 failed", "rl": "upstream sft lr=1 failed"}


def test_kept_trials_count_as_finished_inputs():
    after = {"sft": [], "reward": ["sft"]}
    state = dag.PipelineState(list(after), after, {}, done={"sft"})
    assert state.ready() == ["reward"]


# --------------------------------------------------------------------------- through the planner


@pytest.fixture
def rlhf_plan(tmp_path):
    def plan(*extra):
        return make_plan(["+sweep=rlhf", f"storage.path={tmp_path}", *extra])

    return plan


def test_rlhf_plan_wires_each_stage_to_its_upstream_outputs(rlhf_plan, tmp_path):
    plan = rlhf_plan()
    trials = {t.label: t for t in plan.trials}
    assert list(trials)[:2] == ["sft", "reward"]
    assert set(trials) == {"sft", "reward", "rl r=4", "rl r=16", "dpo", "orpo"}
    sft, reward = trials["sft"], trials["reward"]
    out = tmp_path / "rlhf"
    for label in ("rl r=4", "rl r=16"):
        rl = trials[label]
        assert rl.after == [sft.key, reward.key]
        assert rl.cfg.stage.init_from == str(out / sft.key) and rl.cfg.stage.reward_from == str(out / reward.key)
    assert reward.cfg.stage.name == "reward" and reward.cfg.stage.init_from == str(out / sft.key)
    assert reward.cfg.data.format == "preference" and sft.cfg.data.format == "instruction"
    orpo = trials["orpo"]  # its own branch: from the base model, after nothing
    assert orpo.after == [] and orpo.cfg.stage.name == "orpo" and orpo.cfg.stage.init_from is None
    assert {trials["rl r=4"].cfg.method.r, trials["rl r=16"].cfg.method.r} == {4, 16}


def test_keys_follow_upstream_keys_not_storage(rlhf_plan, tmp_path):
    base = {t.label: t.key for t in rlhf_plan().trials}
    moved = {t.label: t.key for t in make_plan(["+sweep=rlhf", f"storage.path={tmp_path / 'elsewhere'}"]).trials}
    assert moved == base  # output paths differ, keys do not
    sft_changed = {t.label: t.key for t in rlhf_plan("++sweep.stages.sft.overrides.train.max_steps=7").trials}
    # everything downstream of sft moves; orpo, on its own branch from the base, does not
    assert [label for label in base if sft_changed[label] == base[label]] == ["orpo"]
    dpo_changed = {t.label: t.key for t in rlhf_plan("++sweep.stages.dpo.overrides.stage.beta=0.3").trials}
    assert [label for label in base if dpo_changed[label] != base[label]] == ["dpo"]


@pytest.mark.parametrize("extra,key,fragment", [
    (["++sweep.axes={method.r:[2]}"], "sweep.axes", "per stage"),
    (["++sweep.stages.sft.overrides.method=prefix"], "sweep.stages.sft", "cannot be merged"),
    (["++sweep.stages.rl.after=[sft]"], "stage.reward_from", "required"),
])
def test_bad_pipelines_are_refused_before_anything_runs(rlhf_plan, extra, key, fragment):
    with pytest.raises(ConfigError) as err:
        rlhf_plan(*extra)
    assert any(k == key and fragment in msg for k, msg in err.value.problems), err.value.problems


# --------------------------------------------------------------------------- the sweep's searcher


class FakeTracker:
    """The child-run side of orchestrator.tracking.SweepTracker, in memory."""

    uri, git = "sqlite:///unused.db", {}

    def __init__(self):
        self.created, self.skipped, self.statuses = [], {}, {}

    def create_child(self, trial, config, input_run_ids=(), tags=None):
        self.created.append((trial.label, list(input_run_ids)))
        return f"run-{trial.label}"

    def skip(self, run_id, reason):
        self.skipped[run_id] = reason

    def set_status(self, run_id, status, reason=None):
        self.statuses[run_id] = (status, reason)


def searcher_of(plan, tmp_path, done=frozenset()):
    from orchestrator.scheduling import SweepSearcher

    events = []
    run_ids = {key: f"run-kept-{key}" for key in done}  # a resumed sweep knows its finished trials' runs
    searcher = SweepSearcher(plan, set(done), run_ids, FakeTracker(), lambda *e: events.append(e), str(tmp_path))
    return searcher, events


def handed(searcher, trial_id):
    """Label of the trial `suggest` hands Tune, or what it says instead (None / FINISHED)."""
    suggestion = searcher.suggest(trial_id)
    if isinstance(suggestion, dict):
        return searcher.live[trial_id].label
    return suggestion


def test_stages_start_as_their_inputs_finish_and_a_failure_skips_downstream(rlhf_plan, tmp_path):
    plan = rlhf_plan("++sweep.stages.dpo.after=[sft]")
    labels = {t.key: t.label for t in plan.trials}
    searcher, events = searcher_of(plan, tmp_path)
    assert [handed(searcher, "t1"), handed(searcher, "t2")] == ["sft", "orpo"]  # orpo needs no sft
    assert handed(searcher, "t3") is None  # nothing else is ready while sft runs
    searcher.on_trial_complete("t1")
    assert [handed(searcher, "t4"), handed(searcher, "t5")] == ["reward", "dpo"]
    searcher.on_trial_complete("t4", error=True)
    assert handed(searcher, "t6") is None  # rl needs reward; dpo and orpo still run
    searcher.on_trial_complete("t5")
    searcher.on_trial_complete("t2")
    assert handed(searcher, "t7") == "FINISHED"
    states = {labels[k]: s for k, s in searcher.state.states.items()}
    assert states == {"sft": "FINISHED", "reward": "FAILED", "dpo": "FINISHED", "rl r=4": "SKIPPED",
                      "rl r=16": "SKIPPED", "orpo": "FINISHED"}
    tracker = searcher.runs
    assert tracker.skipped == {"run-rl r=4": "upstream reward failed", "run-rl r=16": "upstream reward failed"}
    assert sorted(labels[k] for e, k, _ in events if e == "skipped") == ["rl r=16", "rl r=4"]
    inputs = dict(tracker.created)
    assert inputs["sft"] == [] and inputs["reward"] == ["run-sft"] and inputs["rl r=4"] == ["run-sft", "run-reward"]


def test_a_fast_branch_goes_on_while_a_slow_one_runs(tmp_path):
    """No waves: the fast branch's next stage is handed out while the slow branch's first runs."""
    plan = make_plan([f"storage.path={tmp_path}", "sweep.name=branches",
                      "++sweep.stages={slow:{overrides:{train.lr:0.001,stage:sft}},fast:{overrides:{stage:sft}},"
                      "slow_next:{after:[slow],overrides:{stage:sft}},fast_next:{after:[fast],overrides:{stage:sft}}}"])
    searcher, _ = searcher_of(plan, tmp_path)
    assert [handed(searcher, "a"), handed(searcher, "b")] == ["slow", "fast"]
    searcher.on_trial_complete("b")
    assert handed(searcher, "c") == "fast_next"  # slow still running
    assert searcher.state.states[searcher.live["a"].key] == "RUNNING"


def test_kept_trials_are_not_handed_out_again(rlhf_plan, tmp_path):
    plan = rlhf_plan()
    sft = next(t for t in plan.trials if t.label == "sft")
    searcher, _ = searcher_of(plan, tmp_path, done={sft.key})
    assert handed(searcher, "t1") == "reward"  # sft's output is kept from the earlier run
    assert searcher.runs.created == [("reward", [f"run-kept-{sft.key}"])]


def test_the_report_shows_a_skipped_trial_as_skipped():
    """MLflow has no SKIPPED status: a skipped trial's run ends KILLED with a `skip_reason` tag."""
    from types import SimpleNamespace as NS

    from orchestrator.report import _status

    def run(status, **tags):
        return NS(info=NS(status=status), data=NS(tags=tags))

    assert _status(run("KILLED", skip_reason="upstream sft failed")) == "SKIPPED"
    assert _status(run("KILLED")) == "KILLED" and _status(run("FAILED", failure_reason="x")) == "FAILED"
