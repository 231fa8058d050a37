"""The step costs of a tokens or FLOPs budget (orchestrator/budget.py): inside one plan each
distinct data input is prepared once (one tokenizer load, one data pass), and every grid point's
measured cost is the one it gets when measured alone."""

from __future__ import annotations

import pytest

import trainers.templates
import trainers.trial
from orchestrator import budget
from orchestrator.compose import compose
from orchestrator.plan import make_plan

# Grid points on the embedded default that differ in method, batch and seed, not in data.
POINTS = [["method=lora"], ["method=lora", "train.batch_size=4"], ["method=full", "train.batch_size=8"],
          ["method=prompt"], ["method=ia3", "train.batch_size=4", "train.seed=1"]]


@pytest.fixture
def calls(monkeypatch):
    """How often the real prepare_inputs and tokenizer load ran (wrapped, not replaced)."""
    counts = {"prepare_inputs": 0, "load_chat_tokenizer": 0}
    for module, name in ((trainers.trial, "prepare_inputs"), (trainers.templates, "load_chat_tokenizer")):
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


def configs(tmp_path, points):
    return [compose([f"storage.path={tmp_path}", "sweep.budget_unit=flops", "sweep.budget=1.0e12", *p])
            for p in points]


def test_shared_inputs_prepare_the_data_once_and_measure_what_each_point_measures_alone(tmp_path, calls):
    cfgs = configs(tmp_path, POINTS)
    alone = [budget.measured_cost(c) for c in cfgs]
    assert calls == {"prepare_inputs": len(POINTS), "load_chat_tokenizer": len(POINTS)}
    assert all(c is not None for c in alone) and len({c.flops for c in alone}) == len(POINTS)
    with budget.shared_inputs():
        shared = [budget.measured_cost(c) for c in cfgs]
    assert shared == alone
    assert calls == {"prepare_inputs": len(POINTS) + 1, "load_chat_tokenizer": len(POINTS) + 1}
    # the trials' own configs keep their setting: the resolved template went to copies only
    assert all(c.data.template == "auto" for c in cfgs)


def test_other_data_gets_its_own_preparation(tmp_path, calls):
    """Fewer rows and a template the embedded tokenizer does not have (no measured cost) are other
    inputs: each is prepared for itself, and measures as it does alone."""
    cfgs = configs(tmp_path, [[], ["data.max_train_rows=32"], ["data.template=model"], []])
    alone = [budget.measured_cost(c) for c in cfgs]
    assert alone[2] is None and alone[0] == alone[3] and alone[0] != alone[1]
    before = calls["prepare_inputs"]
    with budget.shared_inputs():
        with budget.shared_inputs():  # nested: the outer one's inputs
            first = budget.measured_cost(cfgs[0])
        shared = [first] + [budget.measured_cost(c) for c in cfgs[1:]]
    assert shared == alone and calls["prepare_inputs"] - before == 3


def test_a_plan_prepares_its_shared_data_once_for_its_step_costs(tmp_path, calls):
    plan = make_plan([f"storage.path={tmp_path}", "sweep.name=costs", "sweep.budget_unit=flops",
                      "sweep.budget=2.0e11", "++sweep.variants=[{method:lora},{method:full},{method:prompt}]"])
    assert [t.step_cost.source for t in plan.trials] == ["data"] * 3
    assert calls == {"prepare_inputs": 1, "load_chat_tokenizer": 1}
