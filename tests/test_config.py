"""Every shipped config and sweep composes and validates; bad input names its key."""

from __future__ import annotations

import pytest

from orchestrator.compose import CONF_DIR, available_sweeps, compose
from orchestrator.plan import expand, make_plan, override, trial_key
from trainers.config import ConfigError

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "sweep")
# Options that need a value only the user can give (their own data file).
NEEDS_USER_VALUE = {("data", "instruction"): ["data.train_file=x.jsonl"],
                    ("data", "chat"): ["data.train_file=x.jsonl"]}


def all_options():
    for group in GROUPS:
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            yield group, path.stem


def _valid_companions(group: str, option: str) -> list[str]:
    """Overrides that make a standalone option valid (a quantized base needs an adapter method)."""
    extra = list(NEEDS_USER_VALUE.get((group, option), []))
    if group == "precision" and option in ("fp16",):
        extra.append("train.use_gpu=true")
    if group == "method" and option == "qlora":
        extra.append("precision=nf4")
    if group == "data" and option == "embedded_pref":
        extra.append("stage=dpo")  # preference data is for the preference stages
    if group == "stage" and option in ("reward", "rl", "dpo", "orpo"):
        extra.append("data=embedded_pref")  # the preference stages train on preference data
    if group == "stage" and option == "rl":
        extra.append("stage.reward_from=runs/reward")  # a pipeline fills it in
    return extra


@pytest.mark.parametrize("group,option", list(all_options()))
def test_every_config_option_composes(group, option):
    # Composing validates: a shipped option that is refused with its companions fails here.
    cfg = compose([f"{group}={option}", *_valid_companions(group, option)])
    assert getattr(cfg, group) is not None


@pytest.mark.parametrize("sweep", available_sweeps())
def test_every_sweep_plans(sweep, tmp_path):
    # in tmp_path: a FLOPs budget (peft_tuned) measures step costs on the prepared data
    plan = make_plan([f"+sweep={sweep}", f"storage.path={tmp_path}"])
    assert plan.trials, f"sweep {sweep} has no trials"
    assert len({t.key for t in plan.trials}) == len(plan.trials)
    assert plan.sweep == sweep


def test_lora_rank_sweep_expands_ranks_in_order():
    plan = make_plan(["+sweep=lora_rank"])
    assert [t.cfg.method.r for t in plan.trials] == [1, 2, 4, 8, 16, 32]
    assert all(t.cfg.method.name == "lora" for t in plan.trials)


def test_variants_swap_groups_and_set_values():
    plan = make_plan(["+sweep=full_vs_lora"])
    methods = [t.cfg.method.name for t in plan.trials]
    assert methods[0] == "full" and set(methods[1:]) == {"lora"}
    assert plan.trials[0].cfg.train.lr < plan.trials[1].cfg.train.lr


def test_seeds_multiply_trials_and_change_keys():
    pairs = expand({"axes": {"method.r": [2, 4]}, "seeds": [0, 1, 2]})
    assert len(pairs) == 6
    plan = make_plan(["+sweep=lora_rank", "sweep.seeds=[0,1]"])
    assert len(plan.trials) == 12 and len({t.key for t in plan.trials}) == 12
    assert any("seed=1" in t.label for t in plan.trials)


def test_the_seed_on_the_command_line_is_the_sweeps_seed_unless_sweep_seeds_says_otherwise():
    default, seeded = make_plan([]).trials, make_plan(["train.seed=5"]).trials
    assert [t.cfg.train.seed for t in seeded] == [5] and seeded[0].key != default[0].key
    listed = make_plan(["train.seed=5", "sweep.seeds=[1,2]"])
    assert [t.cfg.train.seed for t in listed.trials] == [1, 2]
    assert any("train.seed=5 is replaced in 2 of 2 trial(s)" in n and "1, 2" in n for n in listed.notes)
    with pytest.raises(ConfigError, match="sweep.seeds"):
        make_plan(["sweep.seeds=[]"])


def test_a_command_line_value_the_sweep_replaces_is_named_in_the_plan():
    from orchestrator.plan import format_plan

    plan = make_plan(["+sweep=lora_rank", "method.r=4", "train.lr=1e-3"])
    notes = [n for n in plan.notes if "command-line" in n]
    assert notes == ["command-line method.r=4 is replaced in 5 of 6 trial(s): the sweep sets method.r to "
                     "1, 2, 8, 16, 32 there"]  # train.lr, which no trial sets, is kept: no note
    assert all(t.cfg.train.lr == 1e-3 for t in plan.trials)
    assert notes[0] in format_plan(plan)
    groups = make_plan(["+sweep=full_vs_lora", "method=full"])
    assert any(n.startswith("command-line method=full is replaced in 3 of 4") and "lora" in n for n in groups.notes)


def variants(*methods: str) -> str:
    return "sweep.variants=[" + ",".join(f"{{method:{m}}}" for m in methods) + "]"


def test_a_method_the_architecture_cannot_take_is_skipped_in_a_comparison(nobias_model):
    from orchestrator.plan import format_plan

    plan = make_plan([f"model.name_or_path={nobias_model}", variants("lora", "bitfit", "ia3")])
    assert [t.cfg.method.name for t in plan.trials] == ["lora", "ia3"]
    (skipped,) = plan.skipped
    assert skipped.label == "bitfit" and skipped.cfg.method.name == "bitfit"
    assert skipped.reason.startswith("method.name: bitfit trains bias terms") and "has none" in skipped.reason
    text = format_plan(plan)
    assert "(+1 skipped as inapplicable)" in text and f"bitfit: {skipped.reason}" in text


def test_an_inapplicable_method_is_refused_alone_on_error_or_beside_a_wrong_setting(nobias_model):
    model = f"model.name_or_path={nobias_model}"
    with pytest.raises(ConfigError, match="method.name: bitfit trains bias terms"):
        make_plan([model, "method=bitfit"])  # a single run
    with pytest.raises(ConfigError, match="bitfit trains bias terms"):  # nothing left to compare
        make_plan([model, "sweep.variants=[{method:bitfit},{method:bitfit,train.lr:0.01}]"])
    with pytest.raises(ConfigError, match="sweep.on_inapplicable=skip leaves it out"):
        make_plan([model, variants("lora", "bitfit"), "sweep.on_inapplicable=error"])
    with pytest.raises(ConfigError, match="precision.name: bitfit trains fp16"):  # a setting to correct
        make_plan([model, "sweep.variants=[{method:lora},{method:bitfit,precision:fp16}]", "train.use_gpu=true"])
    with pytest.raises(ConfigError) as info:
        make_plan([model, variants("lora", "bitfit"), "sweep.on_inapplicable=maybe"])
    assert info.value.problems[0][0] == "sweep.on_inapplicable" and "skip, error" in str(info.value)


def test_trial_key_is_stable_and_ignores_tracking(make_cfg):
    a = make_cfg("method.r=4")
    b = make_cfg("method.r=4", "tracking.uri=http://elsewhere:5000", "storage.path=/tmp/x")
    c = make_cfg("method.r=8")
    assert trial_key(a) == trial_key(b) != trial_key(c)


def test_edited_data_is_a_new_trial_and_a_new_checkpoint_fingerprint(make_cfg, tmp_path):
    """Same config, data file changed in place: the key (so the output dir, the plan and resume)
    and the checkpoint fingerprint change; restoring the bytes restores both."""
    import os
    import shutil

    from trainers.context import trial_fingerprint
    from trainers.data import resolve_path

    data = tmp_path / "train.jsonl"
    shutil.copy(resolve_path("embedded:instruct_train.jsonl"), data)
    cfg = make_cfg(f"data.train_file={data}")
    key, fingerprint = trial_key(cfg), trial_fingerprint(cfg)
    original = data.read_bytes()
    data.write_bytes(original.replace(b'"output": "', b'"output": "x', 1))
    os.utime(data, ns=(1, 1))  # whatever the clock: a new (size, mtime) is a new file to hash
    assert trial_key(cfg) != key and trial_fingerprint(cfg) != fingerprint
    data.write_bytes(original)
    assert trial_key(cfg) == key and trial_fingerprint(cfg) == fingerprint


@pytest.mark.parametrize("change, key_changes, cell_changes", [
    ("tracking.uri=sqlite:///elsewhere.db", False, False),
    ("storage.path=/elsewhere", False, False),
    ("cluster.num_cpus=3", False, False),
    ("train.cpus_per_worker=3", False, False),  # threads change speed, not what is learned
    ("resume=false", False, False),
    ("train.seed=7", True, False),
    ("method.r=4", True, True),
])
def test_trial_key_fingerprint_and_report_cell_agree_on_what_an_experiment_is(make_cfg, change, key_changes,
                                                                              cell_changes):
    """One exclusion list (trainers/identity.py) behind the trial key, the checkpoint fingerprint
    and the report's cells; only the cell ignores the seed."""
    from orchestrator.report import TrialRow
    from orchestrator.tracking import config_params
    from trainers.config import to_container
    from trainers.context import trial_fingerprint

    def identities(cfg):
        row = TrialRow(run_id="", label="", method=cfg.method.name, stage=cfg.stage.name, status="FINISHED",
                       params=config_params(to_container(cfg)), metrics={})
        return trial_key(cfg), trial_fingerprint(cfg), row.cell_key

    base, changed = identities(make_cfg("method=lora")), identities(make_cfg("method=lora", change))
    assert (base[0] != changed[0], base[1] != changed[1], base[2] != changed[2]) == \
        (key_changes, key_changes, cell_changes)


def test_override_quoting():
    assert override("method", "full") == "method=full"
    assert override("method.r", 4) == "method.r=4"
    assert override("method.target_modules", ["q_proj", "v_proj"]) == "method.target_modules=['q_proj','v_proj']"
    assert override("model.revision", None) == "model.revision=null"


@pytest.mark.parametrize("overrides,key,fragment", [
    (["method=nope"], "method", "Available"),
    (["+sweep=nope"], "sweep", "lora_rank"),
    (["method.r=0"], "method.r", "> 0"),
    (["method.r=-3"], "method.r", "> 0"),
    (["method.r=abc"], "method.r", "Integer"),
    (["method.bogus=1"], "method.bogus", "not in"),
    (["train.lr=0"], "train.lr", "> 0"),
    (["train.max_steps=0"], "train.max_steps", "> 0"),
    (["data.overlength=sometimes"], "data.overlength", "error, truncate, drop"),
    (["model.trust_remote_code=true"], "model.trust_remote_code", "revision"),
    (["data=instruction"], "data.train_file", "Missing"),
    (["method=full", "precision=nf4"], "precision.name", "full fine-tuning"),
])
def test_bad_config_names_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    keys = [k for k, _ in info.value.problems]
    assert key in keys, info.value.problems
    assert fragment in str(info.value)


def test_bad_axis_value_is_reported_with_its_trial():
    with pytest.raises(ConfigError) as info:
        make_plan(["+sweep=lora_rank", "sweep.axes={method.r:[4,0]}"])
    assert "method.r" in [k for k, _ in info.value.problems]
    assert "method.r=0" in str(info.value)


def test_a_trial_alone_on_the_node_gets_all_its_cpus_and_trials_side_by_side_one_each():
    from orchestrator.plan import format_plan

    alone = make_plan(["cluster.num_cpus=4"])  # no sweep: one trial
    assert [t.cfg.train.cpus_per_worker for t in alone.trials] == [4]
    assert alone.trials[0].resources["CPU"] == 4.0 and "CPU=4" in format_plan(alone)
    assert "torch threads" in format_plan(alone)
    two_workers = make_plan(["cluster.num_cpus=4", "train.num_workers=2"])
    assert two_workers.trials[0].resources["CPU"] == 2.0  # the node split over the trial's workers
    side_by_side = make_plan(["+sweep=lora_rank", "cluster.num_cpus=4"])
    assert {t.cfg.train.cpus_per_worker for t in side_by_side.trials} == {1}
    assert side_by_side.max_concurrent > 1
    one_at_a_time = make_plan(["+sweep=lora_rank", "cluster.num_cpus=4", "cluster.max_concurrent_trials=1"])
    assert {t.resources["CPU"] for t in one_at_a_time.trials} == {4.0}
    chosen = make_plan(["cluster.num_cpus=4", "train.cpus_per_worker=3"])
    assert chosen.trials[0].resources["CPU"] == 3.0  # a value the user set is kept
    attached = make_plan(["cluster.address=auto"])
    assert attached.trials[0].resources["CPU"] == 1.0
    assert any("train.cpus_per_worker" in note for note in attached.notes)
    assert alone.trials[0].key == chosen.trials[0].key  # the same experiment whatever its threads


def test_plan_reserves_estimated_memory_and_refuses_what_fits_no_node():
    plan = make_plan(["+sweep=lora_rank"])
    for trial in plan.trials:
        assert trial.estimated_bytes and trial.resources["memory"] == trial.estimated_bytes
    gpu = make_plan(["+sweep=lora_rank", "train.use_gpu=true"])
    assert all(0 < t.resources["GPU"] <= 0.1 for t in gpu.trials)  # tiny trials share one GPU
    with pytest.raises(ConfigError) as info:
        make_plan(["method=full", "model.name_or_path=llama-3-70b"])
    assert "needs an estimated" in str(info.value) and "GiB" in str(info.value)
    with pytest.raises(ConfigError, match="cluster.gpu_memory_gb"):
        make_plan(["method=full", "model.name_or_path=llama-3-70b", "train.use_gpu=true"])
