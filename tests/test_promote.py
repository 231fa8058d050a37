"""Promotion of a sweep's best trial into the MLflow Model Registry, on a real SQLite store.

Two real LoRA trials (the demo sweep, fewer steps) are trained through the trainers library and
logged through the project's own tracking code into a parent run and its child runs, as a sweep
logs them (no Ray: the e2e test runs `promote=true` on a real sweep). The winner is promoted, loaded
back through `mlflow.pyfunc`, and its greedy answers on the held-out set must give the exact-match
accuracy the trial logged. Selection rules and bad input use made-up metrics.
"""

from __future__ import annotations

import pytest

from orchestrator.plan import make_plan
from orchestrator.promote import main, pick_winner
from orchestrator.report import collect
from orchestrator.tracking import SweepTracker, TrialTracker

pytestmark = pytest.mark.usefixtures("one_thread")

SWEEP_ARGS = ["+sweep=lora_rank", "sweep.axes={method.r:[1,8]}", "train.max_steps=60", "train.log_every=20",
              "train.checkpoint_every=0", "data.max_train_rows=400", "data.max_eval_rows=60"]


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory):
    """(uri, parent run id): the demo sweep's structure with two real, finished trials."""
    from trainers.trial import run_trial

    root = tmp_path_factory.mktemp("promote")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    plan = make_plan(SWEEP_ARGS)
    tracker = SweepTracker(uri, plan.experiment)
    parent = tracker.start_parent(plan.sweep, SWEEP_ARGS[1:], plan.key)
    for trial in plan.trials:
        run_id = tracker.create_child(trial, trial.config)
        tracker.set_status(run_id, "RUNNING")
        run_trial(trial.cfg, root / trial.key, tracker=TrialTracker(tracker.uri, run_id, rank=0))
        tracker.set_status(run_id, "FINISHED")
    tracker.set_status(parent, "FINISHED")
    return tracker.uri, parent


def held_out_accuracy(model_uri: str, cfg) -> tuple[float, int]:
    """Exact match of the pyfunc model's answers to the eval rows, sent as the text the registered
    prompt template's slot takes; and how many rows."""
    import mlflow

    from trainers.data import load_rows
    from trainers.templates import format_prompt
    from trainers.evaluate import normalise_answer
    from trainers.export import request_text

    model = mlflow.pyfunc.load_model(model_uri)
    template = model.metadata.metadata["prompt_template"]
    _, rows, _ = load_rows(cfg.data.eval_file, cfg.data.format, cfg.data.max_eval_rows)
    requests = [request_text(format_prompt(row["instruction"], row["input"]), template) for row in rows]
    answers = model.predict(requests)
    hits = sum(normalise_answer(a) == normalise_answer(row["output"]) for a, row in zip(answers, rows))
    return hits / len(rows), len(rows)


def best_child(client, parent_id: str):
    """The trial the rules pick, computed here from the runs: highest accuracy, then fewer parameters."""
    children = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return min(children, key=lambda r: (-r.data.metrics["eval/accuracy"], r.data.metrics["model/trainable_params"]))


def test_merged_winner_is_registered_and_reproduces_its_accuracy(trained_store, make_cfg, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri, parent_id = trained_store
    assert main(["lora_rank", f"tracking.uri={uri}"]) == 0
    assert "lora_rank-best/1" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    winner = best_child(client, parent_id)
    version = client.get_model_version("lora_rank-best", "1")
    assert version.run_id == winner.info.run_id
    tags = version.tags
    assert tags["sweep"] == "lora_rank" and tags["trial_key"] == winner.data.tags["trial_key"]
    assert tags["metric"] == "eval/accuracy" and tags["merged"] == "true"
    assert float(tags["metric_value"]) == winner.data.metrics["eval/accuracy"]
    assert tags["base_model"] == winner.data.params["model.name_or_path"]
    assert client.get_run(parent_id).data.tags["promoted_model"] == "lora_rank-best version 1"

    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info("models:/lora_rank-best/latest")
    flavor = info.flavors["transformers"]
    assert flavor["task"] == "text-generation" and "peft_adaptor" not in flavor  # merged: plain weights

    cfg = make_cfg("data.max_eval_rows=60")
    accuracy, n = held_out_accuracy("models:/lora_rank-best/latest", cfg)
    # The same greedy decoding of the same prompts, but not the same float sums: the trial's
    # evaluation ran left-padded batches through the unmerged LoRA layers (Wx + BAx), the served
    # model answers one prompt at a time with W + BA merged. That can flip a greedy token only where
    # two logits tie to ~1e-6: allow one such answer (measured here: no answer differed).
    assert abs(accuracy - winner.data.metrics["eval/accuracy"]) <= 1 / n + 1e-9
    assert accuracy > 0  # the answers are the task's, not empty strings


def test_unmerged_registers_base_plus_adapter_with_the_same_answers(trained_store, make_cfg):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri, parent_id = trained_store
    assert main(["lora_rank", f"tracking.uri={uri}", "name=lora-adapter", "merge=false"]) == 0
    client = MlflowClient(tracking_uri=uri)
    winner = best_child(client, parent_id)
    assert client.get_model_version("lora-adapter", "1").tags["merged"] == "false"
    mlflow.set_tracking_uri(uri)
    assert "peft_adaptor" in mlflow.models.get_model_info("models:/lora-adapter/1").flavors["transformers"]
    accuracy, n = held_out_accuracy("models:/lora-adapter/1", make_cfg("data.max_eval_rows=60"))
    # Unmerged, as in the trial; one prompt at a time instead of left-padded batches (see above).
    assert abs(accuracy - winner.data.metrics["eval/accuracy"]) <= 1 / n + 1e-9


# --------------------------------------------------------------------------- selection and bad input


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory):
    """A store whose sweeps have made-up final metrics (no training): returns (uri, log_sweep) where
    log_sweep(sweep_name, plan_args, metrics_of(trial) -> dict | None) logs one parent run; a trial
    whose metrics are None ends FAILED."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('fake') / 'mlflow.db'}"

    def log_sweep(name: str, plan_args: list[str], metrics_of) -> str:
        plan = make_plan(plan_args)
        tracker = SweepTracker(uri, name)
        parent = tracker.start_parent(name, plan_args, "")
        for trial in plan.trials:
            run_id = tracker.create_child(trial, trial.config)
            metrics = metrics_of(trial)
            if metrics is None:
                tracker.set_status(run_id, "FAILED", "made-up failure")
                continue
            TrialTracker(tracker.uri, run_id, rank=0).log_metrics(metrics)
            tracker.set_status(run_id, "FINISHED")
        tracker.set_status(parent, "FINISHED")
        return parent

    return uri, log_sweep


def winner_of(uri: str, parent_id: str, metric: str = "eval/accuracy", mode: str = "max"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    winner = pick_winner(collect(client, client.get_run(parent_id)), metric, mode)
    return client.get_run(winner.run_id), winner


def test_seeds_are_averaged_before_the_best_cell_is_picked(fake_store):
    uri, log_sweep = fake_store
    # r=1 has the single best seed (0.9) but the lower mean (0.55 vs 0.6).
    accuracy = {(1, 0): 0.9, (1, 1): 0.2, (4, 0): 0.6, (4, 1): 0.6}
    parent = log_sweep("seeded", ["+sweep=lora_rank", "sweep.axes={method.r:[1,4]}", "sweep.seeds=[0,1]"],
                       lambda t: {"eval/accuracy": accuracy[(t.cfg.method.r, t.cfg.train.seed)],
                                  "model/trainable_params": 1000.0 * t.cfg.method.r})
    run, winner = winner_of(uri, parent)
    assert run.data.params["method.r"] == "4"
    assert winner.value == pytest.approx(0.6) and winner.seeds == 2
    run, winner = winner_of(uri, parent, mode="min")  # lowest mean: r=1 (0.55); its best seed by min is 0.2
    assert run.data.params["method.r"] == "1" and winner.trial_value == pytest.approx(0.2)


def test_a_tie_goes_to_fewer_trainable_parameters(fake_store):
    uri, log_sweep = fake_store
    parent = log_sweep("tied", ["+sweep=lora_rank", "sweep.axes={method.r:[16,2,8]}"],
                       lambda t: {"eval/accuracy": 0.5, "model/trainable_params": 1000.0 * t.cfg.method.r})
    run, _ = winner_of(uri, parent)
    assert run.data.params["method.r"] == "2"


def test_a_trial_stopped_early_is_not_a_candidate(fake_store):
    from mlflow.tracking import MlflowClient

    uri, log_sweep = fake_store
    parent = log_sweep("asha", ["+sweep=lora_rank", "sweep.axes={method.r:[1,2]}"],
                       lambda t: {"eval/accuracy": 0.9 if t.cfg.method.r == 1 else 0.4,
                                  "model/trainable_params": 1000.0 * t.cfg.method.r})
    client = MlflowClient(tracking_uri=uri)
    r1 = [r for r in collect(client, client.get_run(parent)) if r.params["method.r"] == "1"][0]
    client.set_tag(r1.run_id, "early_stopped", "true")  # as the runner tags a trial ASHA stopped
    run, _ = winner_of(uri, parent)
    assert run.data.params["method.r"] == "2"


def test_the_default_metric_is_the_stages_headline(fake_store, monkeypatch):
    """Without metric=, trials are ranked by their stage's RecipeSpec.headline."""
    from trainers.recipes import RECIPES

    uri, log_sweep = fake_store
    parent = log_sweep("headline", ["+sweep=lora_rank", "sweep.axes={method.r:[1,2]}"],
                       lambda t: {"eval/accuracy": 0.9 if t.cfg.method.r == 1 else 0.4,
                                  "eval/loss": 2.0 if t.cfg.method.r == 1 else 1.0,
                                  "model/trainable_params": 1000.0 * t.cfg.method.r})
    run, winner = winner_of(uri, parent, metric="", mode="")
    assert run.data.params["method.r"] == "1" and winner.metric == "eval/accuracy"
    monkeypatch.setattr(RECIPES["sft"], "headline", ("eval/loss", "min"))
    run, winner = winner_of(uri, parent, metric="", mode="")
    assert run.data.params["method.r"] == "2" and winner.metric == "eval/loss"


def test_stages_ranked_differently_need_a_metric(monkeypatch):
    from types import SimpleNamespace

    from orchestrator.promote import PromoteError, ranking
    from trainers.recipes import RECIPES

    rows = [SimpleNamespace(stage="sft"), SimpleNamespace(stage="dpo")]
    assert ranking(rows, "", "") == ("eval/accuracy", "max")
    assert ranking(rows, "eval/loss", "") == ("eval/loss", "max")
    monkeypatch.setattr(RECIPES["dpo"], "headline", ("eval/pairwise_accuracy", "max"))
    with pytest.raises(PromoteError, match="metric="):
        ranking(rows, "", "")


def registered_names(uri: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    return [m.name for m in MlflowClient(tracking_uri=uri).search_registered_models()]


@pytest.fixture(scope="module")
def bad_sweeps(fake_store):
    uri, log_sweep = fake_store
    plan_args = ["+sweep=lora_rank", "sweep.axes={method.r:[1,2]}"]
    log_sweep("failing", plan_args, lambda t: {"eval/accuracy": 0.5, "model/trainable_params": 10.0})
    log_sweep("all_failed", plan_args, lambda t: None)
    log_sweep("bottleneck", ["method=adapter"], lambda t: {"eval/accuracy": 0.5})
    return uri


@pytest.mark.parametrize("case, args, reason", [
    ("unknown sweep", ["no_such_sweep"], "no parent run with tag sweep=no_such_sweep"),
    ("unlogged metric", ["failing", "metric=eval/bleu"], "metric 'eval/bleu': no FINISHED trial logged it"),
    ("no finished trial", ["all_failed"], "no FINISHED trial"),
    ("unservable method", ["bottleneck"], "method adapter: its trained modules are this project's own"),
    ("bad option", ["failing", "mode=best"], "mode: must be max or min"),
    ("unknown option", ["failing", "metirc=eval/loss"], "metirc: unknown option"),
])
def test_bad_input_exits_2_with_the_reason_and_registers_nothing(bad_sweeps, capsys, case, args, reason):
    uri = bad_sweeps
    assert main([*args, f"tracking.uri={uri}"]) == 2
    assert reason in capsys.readouterr().err
    assert registered_names(uri) == []


@pytest.mark.parametrize("method, merged", [("ia3", True), ("ln_tuning", True), ("bitfit", True), ("prefix", False)])
def test_served_model_answers_as_the_trial_evaluated(tmp_path, make_cfg, method, merged):
    """Through a plain transformers pipeline with the served settings: merged (IA)3 and LayerNorm
    tuning, BitFit's biases in place, and a prefix-tuned model (cannot merge: base + adapter,
    decoded without KV cache as in evaluation) give the trial's own greedy answers to its
    held-out prompts."""
    import torch
    import transformers

    from trainers.data import load_rows, tokenize_split
    from trainers.templates import format_prompt
    from trainers.evaluate import generate_answers
    from trainers.export import request_text, serving_model
    from trainers.methods import load_trained
    from trainers.model import load_base_model, load_tokenizer
    from trainers.trial import run_trial

    cfg = make_cfg(f"method={method}", "train.max_steps=20", "train.checkpoint_every=0",
                   "data.max_train_rows=200", "data.max_eval_rows=30")
    run_trial(cfg, tmp_path / "trial")
    served = serving_model(cfg, tmp_path / "trial" / "adapter", merge=True)
    assert served.merged is merged and bool(served.note) is not merged

    tokenizer = load_tokenizer(cfg.model)
    fmt, rows, sources = load_rows(cfg.data.eval_file, cfg.data.format, cfg.data.max_eval_rows)
    prompts = tokenize_split(tokenizer, rows, sources, fmt, cfg.data.max_seq_len, "error", with_prompts=True).prompts
    trained = load_trained(load_base_model(cfg, torch.device("cpu")), tmp_path / "trial" / "adapter")
    expected = generate_answers(trained, tokenizer, prompts, 64, cfg.data.max_new_tokens, torch.device("cpu"))

    pipeline = transformers.pipeline("text-generation", model=served.model, tokenizer=served.tokenizer)
    requests = [served.prompt_template.format(prompt=request_text(format_prompt(r["instruction"], r["input"]),
                                                                  served.prompt_template)) for r in rows]
    answers = [out[0]["generated_text"] for out in pipeline(requests, return_full_text=False, **served.generate)]
    assert [a.strip() for a in answers] == [e.strip() for e in expected]


def test_a_model_chat_template_is_served_as_evaluated(tmp_path, make_cfg):
    """data.template=model with a Llama-3 style template whose end of turn (<|eot_id|>) is not the
    base's eos: the served prompt template is the model's rendering of one user turn, and greedy
    answers (stopping at the end of turn) equal the trial's evaluation."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_templates import LLAMA3, SPECIALS, make_tokenizer
    from trainers.data import load_rows, tokenize_split
    from trainers.evaluate import generate_answers
    from trainers.export import request_text, serving_model
    from trainers.methods import load_trained
    from trainers.model import load_base_model
    from trainers.templates import chat_template, conversation, load_chat_tokenizer
    from trainers.trial import run_trial

    base = make_tokenizer(LLAMA3, SPECIALS["llama3"] + ["<|end_of_text|>"], "<|end_of_text|>")
    base.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(base), max_position_embeddings=256,
                                 pad_token_id=base.pad_token_id, eos_token_id=base.eos_token_id)
                     ).save_pretrained(tmp_path / "model")
    cfg = make_cfg(f"model.name_or_path={tmp_path / 'model'}", "data.template=model", "train.max_steps=2",
                   "train.checkpoint_every=0", "data.max_train_rows=100", "data.max_eval_rows=20",
                   "data.max_seq_len=128")
    run_trial(cfg, tmp_path / "trial")
    served = serving_model(cfg, tmp_path / "trial" / "adapter", merge=True)
    assert served.prompt_template.startswith("<|begin_of_text|><|start_header_id|>user")
    assert served.prompt_template.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")

    tokenizer = load_chat_tokenizer(cfg)
    fmt, rows, sources = load_rows(cfg.data.eval_file, cfg.data.format, cfg.data.max_eval_rows)
    prompts = tokenize_split(tokenizer, rows, sources, fmt, cfg.data.max_seq_len, "error", with_prompts=True,
                             template="model").prompts
    trained = load_trained(load_base_model(cfg, torch.device("cpu")), tmp_path / "trial" / "adapter")
    expected = generate_answers(trained, tokenizer, prompts, 64, cfg.data.max_new_tokens, torch.device("cpu"))

    template = chat_template(tokenizer, "model")
    rendered = [template.render(conversation(row, fmt)[:-1], generation=True) for row in rows]
    requests = [request_text(text, served.prompt_template) for text in rendered]
    assert any(answer.strip() for answer in expected)  # two steps from random init: not yet ending at once
    assert requests[0] == rows[0]["instruction"] + (f"\n\n{rows[0]['input']}" if rows[0]["input"] else "")
    pipeline = transformers.pipeline("text-generation", model=served.model, tokenizer=served.tokenizer)
    answers = [out[0]["generated_text"] for out in pipeline(
        [served.prompt_template.format(prompt=r) for r in requests], return_full_text=False, **served.generate)]
    assert [a.strip() for a in answers] == [e.strip() for e in expected]


# --------------------------------------------------------------------------- within sweep.memory_limit


@pytest.fixture(scope="module")
def capped_sweep(fake_store):
    """r=4 is the more accurate but is estimated at 5 GiB (+ 0.5 GiB CPU runtime overhead); r=1 at
    1 GiB; the sweep ran with sweep.memory_limit=4GiB (its trials log it as a param)."""
    uri, log_sweep = fake_store
    peak = {1: 1 * 2**30, 4: 5 * 2**30}
    parent = log_sweep("capped", ["+sweep=lora_rank", "sweep.axes={method.r:[1,4]}", "sweep.memory_limit=4GiB"],
                       lambda t: {"eval/accuracy": 0.9 if t.cfg.method.r == 4 else 0.4,
                                  "mem/estimated_peak_bytes": peak[t.cfg.method.r],
                                  "model/trainable_params": 1000.0 * t.cfg.method.r})
    return uri, parent


def test_the_best_trial_within_the_sweeps_memory_limit_wins_and_the_output_says_so(capped_sweep):
    from mlflow.tracking import MlflowClient

    from orchestrator.memcap import sweep_limit
    from orchestrator.promote import Promotion, describe

    uri, parent = capped_sweep
    client = MlflowClient(tracking_uri=uri)
    rows = collect(client, client.get_run(parent))
    assert sweep_limit(rows) == 4 * 2**30
    uncapped = pick_winner(rows, "eval/accuracy", "max")
    capped = pick_winner(rows, "eval/accuracy", "max", sweep_limit(rows))
    assert client.get_run(uncapped.run_id).data.params["method.r"] == "4" and not uncapped.memory_note
    assert client.get_run(capped.run_id).data.params["method.r"] == "1"
    # under a limit given by hand: r=4's 5 GiB + 0.5 GiB runtime overhead fits 6 GiB
    assert client.get_run(pick_winner(rows, "eval/accuracy", "max", 6 * 2**30).run_id).data.params["method.r"] == "4"
    text = describe(Promotion("capped-best", "1", capped, merged=True))
    assert "within memory limit 4.00 GiB (estimated" in text and "1 of 2 finished trial(s) over it" in text


@pytest.mark.parametrize("args, reason", [
    (["memory_limit=lots"], "memory_limit: 'lots' is not a size"),
    (["memory_limit=512MiB"], "no FINISHED trial is estimated within memory limit 512.0 MiB"),
])
def test_a_bad_or_too_small_memory_limit_exits_2_and_registers_nothing(capped_sweep, capsys, args, reason):
    uri, _ = capped_sweep
    assert main(["capped", *args, f"tracking.uri={uri}"]) == 2
    assert reason in capsys.readouterr().err
    assert "capped-best" not in registered_names(uri)
