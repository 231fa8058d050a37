"""The memory cap without Ray: sizes as users type them; `sweep.memory_limit` leaving out before
Ray the trials (pipeline trials downstream of them, searched grid points) estimated over it, and
refusing a limit that is unparsable or leaves nothing; a draw over the limit failing as a trial of
its own; and `python -m trainers.memory fit`, whose search is checked against a brute-force scan."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from orchestrator.memcap import OVER_MEMORY_LIMIT, draw_refusal
from orchestrator.plan import format_plan, make_plan
from trainers import memory
from trainers.config import ConfigError
from trainers.memory.fit import fit_batch, largest_fitting
from trainers.memory.sizes import format_size, parse_size

GIB, MIB = 2**30, 2**20
BATCHES = "++sweep.axes={train.batch_size:[1,64]}"


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("text, size", [
    ("24GiB", 24 * 1024**3), ("512MiB", 512 * 1024**2), ("8GB", 8 * 1000**3), ("1.5GiB", 3 * 1024**3 // 2),
    ("1073741824", 1024**3), (1073741824, 1024**3), ("64 kib", 64 * 1024), ("2TB", 2 * 1000**4), ("100B", 100),
])
def test_sizes_in_binary_and_decimal_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, fragment", [
    ("24G", "unknown unit"), ("lots", "not a size"), ("-1GiB", "not a size"), ("0", "positive"),
    ("", "not a size"), (True, "not a size"), ("24 GiB of RAM", "not a size"),
])
def test_bad_sizes_are_refused_saying_what_is_accepted(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_size(text)


@pytest.mark.parametrize("size, spread, text", [
    (512, None, "512 B"), (8000, None, "7.81 KiB"), (8 * GIB, None, "8.00 GiB"), (8.04 * GIB, None, "8.04 GiB"),
    (24 * GIB, None, "24.0 GiB"), (1023 * MIB, None, "1,023.0 MiB"), (12.3 * MIB, 0.4 * MIB, "12.3 ± 0.4 MiB"),
    (3 * GIB, 200 * MIB, "3.00 ± 0.20 GiB"),  # the spread in the mean's unit, though under a GiB
])
def test_sizes_show_two_decimals_below_ten_units_and_the_spread_in_the_means_unit(size, spread, text):
    """One format for the plan's limits and estimates and the report's cells: an estimate a little
    over a limit reads apart from it."""
    assert format_size(size, spread) == text


# --------------------------------------------------------------------------- the plan


def plan_of(tmp_path, *extra):
    return make_plan([f"storage.path={tmp_path}", "sweep.name=capped", *extra])


@pytest.fixture(scope="module")
def estimates(tmp_path_factory):
    """The plan's own estimates of lora at batch 1 and 64, without a limit."""
    plan = plan_of(tmp_path_factory.mktemp("plain"), BATCHES)
    return {t.cfg.train.batch_size: t.estimated_bytes for t in plan.trials}


def test_a_trial_over_the_limit_is_left_out_and_listed_with_its_estimate(tmp_path, estimates):
    assert estimates[1] < estimates[64]
    limit = (estimates[1] + estimates[64]) // 2
    plan = plan_of(tmp_path, BATCHES, f"sweep.memory_limit={limit}")
    assert [t.cfg.train.batch_size for t in plan.trials] == [1]
    (skipped,) = plan.skipped
    assert skipped.state == OVER_MEMORY_LIMIT and skipped.cfg.train.batch_size == 64
    assert skipped.problems[0][0] == "sweep.memory_limit"
    estimate_mib, limit_mib = f"{estimates[64] / MIB:,.1f} MiB", f"{limit / MIB:,.1f} MiB"
    assert estimate_mib in skipped.reason and limit_mib in skipped.reason
    text = format_plan(plan)
    assert "1 trial(s) (+1 skipped as over sweep.memory_limit)" in text
    assert "estimated over sweep.memory_limit" in text and f"{skipped.label}: {skipped.reason}" in text
    # At the estimate exactly, it fits: the limit is inclusive.
    assert len(plan_of(tmp_path, BATCHES, f"sweep.memory_limit={estimates[64]}").trials) == 2
    assert not plan_of(tmp_path, BATCHES, "sweep.memory_limit=null").skipped


def test_a_limit_that_leaves_nothing_names_the_smallest_estimate(tmp_path, estimates):
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, BATCHES, f"sweep.memory_limit={estimates[1] - 1}")
    (key, message), = err.value.problems
    assert key == "sweep.memory_limit" and "leaves no trial to run" in message
    assert f"{estimates[1] / MIB:,.1f} MiB" in message and "batch_size=1" in message


@pytest.mark.parametrize("value", ["lots", "24G", "-3GiB"])
def test_an_unparsable_limit_is_refused_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, f"sweep.memory_limit={value}")
    assert err.value.problems[0][0] == "sweep.memory_limit" and value in err.value.problems[0][1]


def test_pipeline_trials_downstream_of_one_over_the_limit_are_left_out_too(tmp_path):
    plain = {t.stage: t.estimated_bytes for t in make_plan(["+sweep=rlhf", f"storage.path={tmp_path}"]).trials}
    limit = (plain["sft"] + plain["reward"]) // 2
    assert plain["sft"] < limit < plain["reward"]
    plan = make_plan(["+sweep=rlhf", f"storage.path={tmp_path}", f"sweep.memory_limit={limit}"])
    assert [t.stage for t in plan.trials] == ["sft"]
    reasons = {t.label: t.reason for t in plan.skipped}
    assert "rl r=4" in reasons and "starts from 'reward'" in reasons["rl r=4"]
    assert "> limit" in reasons["reward"]


SEARCHED = ["++sweep.search={train.lr:{loguniform:[1.0e-4,1.0e-2]}}", "sweep.num_samples=2",
            # equal budgets: 64 rows per step either way
            "++sweep.variants=[{train.batch_size:1,train.grad_accum:64},{train.batch_size:64}]"]


def test_a_searched_grid_point_whose_default_trial_is_over_the_limit_is_left_out(tmp_path):
    plain = plan_of(tmp_path, *SEARCHED)
    assert len(plain.groups) == 2
    small, large = sorted(t.estimated_bytes for t in plain.trials)
    plan = plan_of(tmp_path, *SEARCHED, f"sweep.memory_limit={(small + large) // 2}")
    (group,) = plan.groups
    assert group.default.cfg.train.batch_size == 1 and [t.key for t in plan.trials] == [group.default.key]
    assert "budget lora batch_size=64" in format_plan(plain) and "budget lora batch_size=64" not in format_plan(plan)


def test_a_draw_over_the_limit_fails_as_its_own_trial_and_the_plan_says_it_may(tmp_path, estimates):
    from orchestrator.scheduling import SweepSearcher

    limit = (estimates[1] + estimates[64]) // 2
    plan = plan_of(tmp_path, "sweep.search_alg=random", "sweep.num_samples=6",
                   "++sweep.search={train.batch_size:{choice:[1,2,64]}}", "train.batch_size=2",
                   f"sweep.memory_limit={limit}")
    notes = [n for n in plan.notes if "train.batch_size=64" in n]
    assert len(notes) == 1 and "fail as trials of their own" in notes[0]
    assert draw_refusal(plan.trials[0].cfg, plan.base.sweep) is None

    class Runs:
        uri, git = "sqlite:///unused.db", {}
        statuses: dict = {}

        def create_child(self, trial, config, input_run_ids=(), tags=None):
            return f"run-{trial.key}"

        def set_status(self, run_id, status, reason=None):
            self.statuses[run_id] = (status, reason)

    events = []
    searcher = SweepSearcher(plan, set(), {}, Runs(), lambda *e: events.append(e), str(tmp_path))
    handed = []
    for i in range(20):
        if not isinstance(searcher.suggest(f"t{i}"), dict):
            break
        handed.append(searcher.live[f"t{i}"])
        searcher.on_trial_complete(f"t{i}", result={"eval/loss": 1.0})
    assert {t.cfg.train.batch_size for t in handed} == {1, 2}  # only what fits runs
    refused = [fields["reason"] for event, _, fields in events if event == "error"]
    assert refused and all("over sweep.memory_limit" in r and f"{estimates[64] / MIB:,.1f} MiB" in r
                           for r in refused)
    assert sum(status == "FAILED" for status, _ in Runs.statuses.values()) == len(refused)


# --------------------------------------------------------------------------- fit


def test_largest_fitting_agrees_with_a_scan_in_few_calls():
    for threshold in range(0, 70):
        for high in (1, 2, 3, 7, 31, 32, 33, 64):
            calls = []

            def fits(n):
                calls.append(n)
                return n <= threshold

            scan = max([n for n in range(1, high + 1) if n <= threshold], default=0)
            assert largest_fitting(fits, high) == scan, (threshold, high)
            assert len(calls) <= 2 * math.ceil(math.log2(high + 1)) + 1


TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256, "tie_word_embeddings": True}


def tiny_cfg(method="lora", precision="fp32", seq_len=64):
    from argparse import Namespace

    from trainers.memory.cli import experiment

    args = Namespace(rank=8, seq_len=seq_len, eval_batch_size=0, stage="sft", double_quant=False, batch_size=1,
                     optimizer="adamw", device="cpu", gradient_checkpointing=False)
    return experiment("llama-2-7b", method, precision, args)  # a name for the config: TINY is the shape


def scan(cfg, limit, global_batch, top):
    """The largest batch in [1, top] whose estimate (with the accumulation it needs) fits: every
    batch tried, no assumption about the estimate's shape."""
    best = 0
    for batch in range(1, top + 1):
        cfg.train.batch_size, cfg.train.grad_accum = batch, math.ceil(global_batch / batch) if global_batch else 1
        if memory.estimate(cfg, TINY, device="cpu").total_bytes <= limit:
            best = batch
    return best


@pytest.mark.parametrize("method, precision", [("lora", "fp32"), ("full", "fp32"), ("lora", "bf16")])
def test_fit_matches_a_brute_force_scan_on_a_tiny_shape(method, precision):
    cfg = tiny_cfg(method, precision)
    one = fit_batch(cfg, 10 * GIB, 1, TINY, "cpu").total_bytes
    for extra in (0, 1_000_000, 5_000_000, 15_000_000, 30_000_000):
        limit = one + extra
        for global_batch in (24, 40):
            fit = fit_batch(cfg, limit, global_batch, TINY, "cpu")
            assert fit.micro_batch == scan(cfg, limit, global_batch, global_batch), (extra, global_batch)
            if fit.fits:
                assert fit.grad_accum == math.ceil(global_batch / fit.micro_batch)
                assert fit.micro_batch * fit.grad_accum >= global_batch
        no_global = fit_batch(cfg, limit, None, TINY, "cpu")
        assert no_global.grad_accum == 1 and no_global.micro_batch == scan(cfg, limit, None, 300)


def test_fit_grows_with_memory_shrinks_with_sequence_and_refuses_below_batch_one():
    cfg = tiny_cfg()
    batches = [fit_batch(cfg, limit, 64, TINY, "cpu").micro_batch for limit in range(GIB // 2, GIB, 20 * MIB)]
    assert batches == sorted(batches) and batches[-1] > batches[0]
    by_seq = [fit_batch(tiny_cfg(seq_len=seq), 600 * MIB, 64, TINY, "cpu").micro_batch for seq in (32, 64, 128, 256)]
    assert by_seq == sorted(by_seq, reverse=True) and by_seq[0] > by_seq[-1]
    too_small = fit_batch(cfg, 100 * MIB, 64, TINY, "cpu")
    assert not too_small.fits and too_small.total_bytes > 100 * MIB


def test_fit_cli_prints_batch_and_accumulation_per_method_and_precision(capsys):
    args = ["fit", "llama-3-8b", "--memory", "40GiB", "--seq-len", "512", "--global-batch", "64",
            "--methods", "full,lora,qlora", "--precisions", "bf16,nf4"]
    assert memory.main(args) == 0
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines()
            if line.split()[:1] in (["full"], ["lora"], ["qlora"])}
    assert rows[("full", "nf4")][0] == "n/a" and rows[("qlora", "bf16")][0] == "n/a"
    assert rows[("full", "bf16")][:3] == ["does", "not", "fit"]  # 8B params x 8 B/param: 60 GiB
    lora, qlora = (int(rows[k][0]) for k in (("lora", "bf16"), ("qlora", "nf4")))
    assert qlora >= lora >= 1  # a 4-bit base leaves more room for the batch
    micro, accum, total = (int(v) for v in rows[("lora", "bf16")][:3])
    assert accum == math.ceil(64 / micro) and total == micro * accum
    assert " ".join(rows[("full", "bf16")]).endswith("GiB at batch 1")


def test_fit_refuses_a_bad_size_and_the_plain_command_still_works():
    result = subprocess.run([sys.executable, "-m", "trainers.memory", "fit", "llama-2-7b", "--memory", "24G"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error: --memory: '24G': unknown unit" in result.stderr
    assert memory.main(["fit", "llama-2-7b", "--memory", "lots"]) == 2
    assert memory.main(["fit", "llama-2-7b", "--memory", "8GiB", "--global-batch", "0"]) == 2
    assert memory.main(["llama-2-7b", "--precisions", "bf16", "--methods", "lora"]) == 0
