"""Register a sweep's best trial in the MLflow Model Registry, ready to serve:

    python -m orchestrator.promote SWEEP_NAME [metric=eval/accuracy] [mode=max] [tracking.uri=...]
                                              [name=SWEEP_NAME-best] [merge=true] [memory_limit=24GiB]

metric and mode default to the headline metric of the candidates' stage (RecipeSpec.headline:
eval/accuracy, max, for every stage that produces a text-generation model today).

Reads the newest parent run of the sweep (tag `sweep`) and its trials the way the report does
(orchestrator/cells.py: trials differing only by seed are one cell, scored by their mean over the
finished seeds; trials ASHA stopped early are not candidates). Under a memory limit (the sweep's
own sweep.memory_limit, as its trials logged it, or memory_limit=SIZE; memory_limit=none: no cap)
only trials whose estimated memory fits it are candidates (orchestrator/memcap.py: the logged
mem/estimated_peak_bytes plus the runtime overhead). The best cell by `metric` wins,
ties going to fewer trainable parameters; of its seeds, the one with the best own value is
registered. The registered model is an MLflow
`transformers` text-generation model logged into that trial's run: the base with the trial's
adapter merged in (`merge=true`, when the method can merge) or base + PEFT adapter, with the
prompt template and greedy settings the trial was evaluated with, so that

    mlflow.pyfunc.load_model("models:/NAME/latest").predict(["question"])

answers as the trial did. Exit 2, with nothing registered, for an unknown sweep, a metric no
finished trial logged, no finished trial, or a method that cannot be served.
"""

from __future__ import annotations

import sys
import tempfile
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# metric and mode "": the candidates' stage's headline (RecipeSpec.headline); mode alone defaults to max.
# memory_limit "": the sweep's own sweep.memory_limit (none when it had none); "none": no cap.
DEFAULTS = {"metric": "", "mode": "", "tracking.uri": "sqlite:///mlflow.db", "name": "", "merge": "true",
            "memory_limit": ""}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
MODEL_ARTIFACT = "registered_models"  # where in the trial's run each promotion logs its served model
SERVING_PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "tokenizers")


class PromoteError(Exception):
    """Bad input: the message says which and why; nothing was registered."""


@dataclass
class Winner:
    run_id: str
    label: str
    trial_key: str
    value: float  # the cell's mean over its finished seeds (what was compared)
    trial_value: float  # the registered trial's own value
    seeds: int
    trainable: float | None
    metric: str = ""  # what it won by
    memory_note: str = ""  # the memory limit it was chosen within, and what that left out


@dataclass
class Promotion:
    name: str
    version: str
    winner: Winner
    merged: bool
    note: str = ""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_args(argv: list[str]) -> tuple[str, dict[str, str]]:
    """SWEEP_NAME and KEY=VALUE options (DEFAULTS filled in, values checked)."""
    positional = [a for a in argv if "=" not in a]
    if len(positional) != 1:
        raise PromoteError("usage: python -m orchestrator.promote SWEEP_NAME [metric=...] [mode=max|min] "
                           "[tracking.uri=...] [name=...] [merge=true|false] [memory_limit=SIZE|none]")
    options = dict(DEFAULTS)
    for arg in argv:
        if "=" in arg:
            key, value = arg.split("=", 1)
            if key not in DEFAULTS:
                raise PromoteError(f"{key}: unknown option; known: {', '.join(DEFAULTS)}")
            options[key] = value
    if options["mode"] not in ("", "max", "min"):
        raise PromoteError(f"mode: must be max or min, got {options['mode']!r}")
    if options["merge"].lower() not in TRUE + FALSE:
        raise PromoteError(f"merge: must be true or false, got {options['merge']!r}")
    if options["memory_limit"].lower() not in ("", "none", "null"):
        memory_limit(options["memory_limit"])
    return positional[0], options


def memory_limit(text: str) -> int:
    from trainers.memory.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise PromoteError(f"memory_limit: {err}") from None


def within_limit(candidates, limit: int | None) -> tuple[list, str]:
    """The candidates whose estimated memory fits `limit`, and a note saying what it left out."""
    from orchestrator.memcap import within
    from trainers.memory.sizes import format_size

    if limit is None:
        return candidates, ""
    kept = [r for r in candidates if within(r, limit)]
    note = (f"within memory limit {format_size(limit)} (estimated: mem/estimated_peak_bytes + runtime overhead); "
            f"{len(candidates) - len(kept)} of {len(candidates)} finished trial(s) over it or without an estimate "
            "were not candidates")
    if not kept:
        raise PromoteError(f"no FINISHED trial is estimated within memory limit {format_size(limit)}: "
                           f"{len(candidates)} finished trial(s) over it or without an estimate (memory_limit=none "
                           "promotes without the cap)")
    return kept, note


def latest_parent(client, sweep: str):
    """The newest parent run tagged `sweep=SWEEP` in any experiment of the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.sweep = '{sweep}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not runs:
        raise PromoteError(f"sweep {sweep!r}: no parent run with tag sweep={sweep} in this MLflow store")
    return runs[0]


def pick_winner(rows, metric: str, mode: str, limit: int | None = None) -> Winner:
    """The best finished trial of causal-LM stages by `metric` (seed cells averaged), within the
    memory `limit` (bytes) if one; see module doc."""
    from orchestrator.cells import group_cells
    from trainers.recipes import RECIPES

    # A trial ASHA stopped early never ran its budget: not a candidate (as in the report's tuning).
    candidates = [r for r in rows if r.status == "FINISHED" and r.tags.get("early_stopped") != "true"
                  and RECIPES.get(r.stage) is not None and RECIPES[r.stage].promotable]
    if not candidates:
        raise PromoteError("no FINISHED trial (that ran its whole budget) of a stage that produces a "
                           "text-generation model")
    candidates, memory_note = within_limit(candidates, limit)
    metric, mode = ranking(candidates, metric, mode)
    cells = [c for c in group_cells(candidates) if c.metric(metric) is not None]
    if not cells:
        logged = sorted({name for r in candidates for name in r.metrics if not name.startswith("train/")})
        raise PromoteError(f"metric {metric!r}: no FINISHED trial logged it; they logged {', '.join(logged)}")
    sign = -1.0 if mode == "max" else 1.0

    def trainable(cell) -> float:
        stat = cell.metric("model/trainable_params")
        return stat.mean if stat is not None else float("inf")

    best = min(cells, key=lambda c: (sign * c.metric(metric).mean, trainable(c)))
    trial = min((r for r in best.finished if r.metric(metric) is not None),
                key=lambda r: (sign * r.metric(metric), r.start_time))
    stat = best.metric(metric)
    return Winner(run_id=trial.run_id, label=trial.label, trial_key=trial.tags.get("trial_key", ""),
                  value=stat.mean, trial_value=trial.metric(metric), seeds=stat.n,
                  trainable=trial.metric("model/trainable_params"), metric=metric, memory_note=memory_note)


def ranking(candidates, metric: str, mode: str) -> tuple[str, str]:
    """(metric, mode) as given, or the headline of the candidates' stage (RecipeSpec.headline)."""
    from trainers.recipes import RECIPES

    if metric:
        return metric, mode or "max"
    headlines = sorted({RECIPES[r.stage].headline for r in candidates})
    if len(headlines) > 1:
        raise PromoteError("the finished trials' stages rank by different metrics "
                           f"({', '.join(f'{m} {d}' for m, d in headlines)}): choose one with metric=...")
    return headlines[0][0], mode or headlines[0][1]


def pip_requirements(with_peft: bool) -> list[str]:
    """Pinned serving requirements (a local build tag like +cpu dropped: it names a wheel index,
    not an API), given explicitly so MLflow does not load the model again to infer them."""
    pins = []
    for name in SERVING_PACKAGES + (("peft",) if with_peft else ()):
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def trial_config(client, run_id: str, where: str):
    """The trial's resolved config (its config.yaml artifact) as an ExperimentConfig."""
    import yaml

    from trainers.config import ConfigError
    from trainers.validate import from_container

    path = client.download_artifacts(run_id, "config.yaml", where)
    with open(path) as handle:
        try:
            return from_container(yaml.safe_load(handle))
        except ConfigError as err:
            raise PromoteError(f"run {run_id}: its config.yaml no longer validates: {err}") from None


def artifact_dir(client, run_id: str, where: str) -> str:
    """The trial's trained artifact, downloaded: `adapter/` (any adapter method) or `model/` (full)."""
    logged = {a.path for a in client.list_artifacts(run_id)}
    for path in ("adapter", "model"):
        if path in logged:
            return client.download_artifacts(run_id, path, where)
    raise PromoteError(f"run {run_id}: no adapter/ or model/ artifact to register")


def save_served(served, cfg, out_dir: Path) -> None:
    """The MLflow transformers model directory of `served` (weights, tokenizer, MLmodel)."""
    import shutil

    import mlflow
    import transformers

    from trainers.export import save_base

    pipeline = transformers.pipeline("text-generation", model=served.model, tokenizer=served.tokenizer)
    mlflow.transformers.save_model(pipeline, str(out_dir), task="text-generation",
                                   prompt_template=served.prompt_template, model_config=served.generate,
                                   pip_requirements=pip_requirements(with_peft=not served.merged))
    if not served.merged:
        # MLflow saves a PEFT model's base through the adapter-injected modules, whose weights
        # (transformers 5 + peft 0.21) come out under `base_layer.` names that no loader maps back:
        # replace them with the untouched base, which the saved adapter then applies to.
        shutil.rmtree(out_dir / "model")
        save_base(cfg, served.tokenizer, out_dir / "model")


def register(client, sweep: str, winner: Winner, name: str, merge: bool) -> Promotion:
    """Build the served model of the winning trial, log it into the trial's run and register it."""
    from mlflow.exceptions import MlflowException

    from trainers.export import NotServable, check_servable, serving_model

    artifact_path = f"{MODEL_ARTIFACT}/{name}-{uuid.uuid4().hex[:8]}"  # promoting again never overwrites
    with tempfile.TemporaryDirectory(prefix="promote-") as where:
        cfg = trial_config(client, winner.run_id, where)
        try:
            check_servable(cfg)  # before any download
            served = serving_model(cfg, artifact_dir(client, winner.run_id, where), merge=merge)
        except NotServable as err:
            raise PromoteError(f"{winner.label} (run {winner.run_id}): {err}") from None
        save_served(served, cfg, Path(where) / "served")
        client.log_artifacts(winner.run_id, str(Path(where) / "served"), artifact_path)
    metric = winner.metric
    tags = {"sweep": sweep, "trial_key": winner.trial_key, "trial": winner.label, "metric": metric,
            "metric_value": repr(winner.value), "trial_metric_value": repr(winner.trial_value),
            "seeds": str(winner.seeds), "base_model": cfg.model.name_or_path, "method": cfg.method.name,
            "merged": str(served.merged).lower(), "prompt_template": served.prompt_template,
            "trainable_params": "" if winner.trainable is None else f"{winner.trainable:.0f}"}
    if served.note:
        tags["note"] = served.note
    if winner.memory_note:
        tags["memory_limit"] = winner.memory_note
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"best trials of sweep {sweep}")
    version = client.create_model_version(
        name, source=f"runs:/{winner.run_id}/{artifact_path}", run_id=winner.run_id, tags=tags,
        description=(f"{sweep}: {winner.label}, {metric} = {winner.value:.4g} "
                     f"(mean of {winner.seeds} seed(s)); {'merged' if served.merged else 'base + adapter'}"))
    return Promotion(name=name, version=str(version.version), winner=winner, merged=served.merged, note=served.note)


def promote(uri: str, sweep: str, metric: str = DEFAULTS["metric"], mode: str = DEFAULTS["mode"],
            name: str = "", merge: bool = True, parent_id: str | None = None,
            limit: str = DEFAULTS["memory_limit"]) -> Promotion:
    """Register the best trial of the newest run of `sweep` (or of parent run `parent_id`) within
    the memory `limit` ("": the sweep's own, "none": no cap); tags that parent run `promoted_model`."""
    from orchestrator.memcap import sweep_limit
    from orchestrator.report import collect
    from orchestrator.tracking import client as make_client

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise PromoteError(f"tracking.uri: no MLflow store at {uri}")
    client = make_client(uri)
    parent = client.get_run(parent_id) if parent_id else latest_parent(client, sweep)
    rows = collect(client, parent)
    if limit.lower() in ("none", "null"):
        cap = None
    else:
        cap = memory_limit(limit) if limit else sweep_limit(rows)
    winner = pick_winner(rows, metric, mode, cap)
    name = name or f"{sweep}-best"
    promotion = register(client, sweep, winner, name, merge)
    client.set_tag(parent.info.run_id, "promoted_model", f"{promotion.name} version {promotion.version}")
    return promotion


def describe(promotion: Promotion) -> str:
    w = promotion.winner
    text = (f"promoted {w.label} (run {w.run_id}, {w.seeds} seed(s): mean {w.value:.4g}, this seed "
            f"{w.trial_value:.4g}) as {promotion.uri} "
            f"({'merged' if promotion.merged else 'base + adapter'})")
    return text + "".join(f"; {note}" for note in (w.memory_note, promotion.note) if note)


def main(argv: list[str] | None = None) -> int:
    from orchestrator.tracking import absolute_uri

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        sweep, options = parse_args(argv)
        promotion = promote(absolute_uri(options["tracking.uri"]), sweep, options["metric"], options["mode"],
                            options["name"], options["merge"].lower() in TRUE, limit=options["memory_limit"])
    except PromoteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(promotion))
    print(f"serve: mlflow models serve -m models:/{promotion.name}/{promotion.version} --env-manager local")
    return 0


if __name__ == "__main__":
    sys.exit(main())
