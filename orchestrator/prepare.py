"""The driver's data pass: every trial's data validated by preparing it (trainers/prepared),
once per distinct input, before any trial or MLflow run exists.

Without `cluster.address` the pass runs here, with a progress bar on a terminal once a pass
takes more than PROGRESS_AFTER_S. Against a cluster it runs as one Ray task on a cluster node
(the data and the prepared datasets are the cluster's: a shared path or an object store), and its
errors (`source:row` and the rule, or a config key) come back and stop the sweep as here. Each
distinct input prints one line saying whether its prepared data was built or reused.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

PROGRESS_AFTER_S = 3.0  # a shorter pass shows no bar


class PassProgress:
    """progress(label, total) -> a rows-done callback that shows a rich bar once the pass is slow;
    `total()` (about the rows the pass reads, or None) is asked then, so a quick pass never pays it."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.bar = stream, None

    def __call__(self, label: str, total: Callable[[], int | None] = lambda: None) -> Callable[[int], None]:
        started, task = time.monotonic(), []

        def update(done: int) -> None:
            if not task and time.monotonic() - started > PROGRESS_AFTER_S and self.stream.isatty():
                task.append(self._bar().add_task(f"preparing {label}", total=total()))
            if task:
                self.bar.update(task[0], completed=done)

        return update

    def _bar(self):
        if self.bar is None:
            from rich.console import Console
            from rich.progress import (BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            from rich.table import Column

            # A long source name is cut, never the count: the description takes what is left.
            self.bar = Progress(SpinnerColumn(),
                                TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True,
                                                                                     overflow="ellipsis")),
                                BarColumn(bar_width=20), TaskProgressColumn(),
                                TextColumn("{task.completed:,} rows"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=Console(file=self.stream), expand=True)
            self.bar.start()
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def prepare_here(container: dict, root: str, progress=None) -> dict:
    """One trial config's data pass in this process: {"template", "status", "line"}, or
    {"error": message} / {"problems": [(key, message)]} for what stops a sweep."""
    from trainers.config import ConfigError
    from trainers.data import DataError
    from trainers.trial import prepare_inputs
    from trainers.validate import from_container

    cfg = from_container(container)
    try:
        data = prepare_inputs(cfg, root, progress)
    except ConfigError as err:
        return {"problems": [list(p) for p in err.problems]}
    except DataError as err:
        return {"error": str(err)}
    return {"template": cfg.data.template, "status": data.status, "line": data.describe()}


def prepare_on_cluster(container: dict, root: str) -> dict:
    """prepare_here as one Ray task on a cluster node (the caller has attached to the cluster)."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=0)(prepare_here)
    return ray.get(task.remote(container, root))


def check_plan_inputs(plan, attach: Callable[[], None] | None = None) -> None:
    """Every trial's data prepared (once per distinct model + data + stage). Each trial's
    `data.template` becomes the template it resolved to: runs log and replay the template used,
    not `auto`, while the trial key (computed before) keeps the setting. `attach()` connects to
    the cluster when `cluster.address` is set (the pass then runs there)."""
    from trainers.config import ConfigError
    from trainers.data import DataError
    from trainers.prepared import prepared_root

    on_cluster = bool(plan.base.cluster.address)
    progress = PassProgress()
    results: dict[tuple, dict] = {}
    try:
        for trial in plan.trials:
            cfg = trial.cfg
            data_key = (cfg.model.name_or_path, repr(cfg.data), cfg.stage.name, cfg.storage.path)
            if data_key not in results:
                root = prepared_root(cfg.storage.path)
                if on_cluster and attach is not None:
                    attach()
                    attach = None
                result = (prepare_on_cluster(trial.config, root) if on_cluster
                          else prepare_here(trial.config, root, progress))
                if "problems" in result:
                    raise ConfigError([tuple(p) for p in result["problems"]])
                if "error" in result:
                    raise DataError(result["error"])
                print(f"data ({cfg.stage.name}): {result['line']}", flush=True)
                results[data_key] = result
            cfg.data.template = results[data_key]["template"]
    finally:
        progress.close()
