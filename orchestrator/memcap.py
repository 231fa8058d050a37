"""The memory cap of a sweep (`sweep.memory_limit=24GiB`, per device): what it leaves out, and
which finished trials it lets the report and promote choose from.

One quantity throughout: a trial's estimated total, the estimator's peak of live tensors
(trainers.memory) plus the runtime overhead (CUDA context, or the Python/torch process), the
number `dry_run=true` prints per trial and `python -m trainers.memory fit` fills.

- Plan (`over_limit`; orchestrator/plan.py: leave_out_over_limit): a trial whose estimate
  (`estimate_bytes`) exceeds the limit is left out before Ray, as a SkippedTrial in state
  OVER_MEMORY_LIMIT with its estimate and the limit (recorded on the parent run, rows of the
  report), and so are the pipeline trials that start from it; a searched grid point whose
  default-setting trial exceeds it is left out whole. A limit that leaves nothing to run refuses
  the sweep, naming the smallest estimate.
- Draws (`draw_refusal`): a drawn trial over the limit (a larger drawn rank or batch) fails as a
  trial of its own, with its estimate, and the next one is drawn; the plan notes each searched
  bound that alone goes over the limit.
- Finished trials (`within`): the logged `mem/estimated_peak_bytes` (the estimate for the trial's
  actual batches, not the measured peak) plus the runtime overhead of the device it ran on.
"""

from __future__ import annotations

from trainers.config import ConfigError
from trainers.memory.sizes import format_size, parse_size

KEY = "sweep.memory_limit"
OVER_MEMORY_LIMIT = "OVER_MEMORY_LIMIT"  # a SkippedTrial's state, and its rows' status in the report


def limit_bytes(value) -> int | None:
    """Bytes of a sweep.memory_limit value; None when unset; ConfigError naming the key."""
    if value in (None, "", "null", "None"):
        return None
    try:
        return parse_size(value)
    except ValueError as err:
        raise ConfigError([(KEY, str(err))]) from None


def over_limit(trials: list, limit: int) -> list[tuple[object, str]]:
    """(trial, reason) of each planned trial (orchestrator.trials.Trial) over `limit`, and of each
    one downstream of those; ConfigError naming the smallest estimate when that is all of them."""
    over: dict[str, str] = {}
    labels = {t.key: t.label for t in trials}
    for t in trials:  # upstream before downstream (plan_pipeline's order)
        upstream = [k for k in t.after if k in over]
        if upstream:
            over[t.key] = f"starts from '{labels[upstream[0]]}', left out over the limit"
        elif t.estimated_bytes is not None and t.estimated_bytes > limit:
            over[t.key] = (f"estimated {format_size(t.estimated_bytes)} per worker (peak + runtime overhead) "
                           f"> limit {format_size(limit)}")
    if trials and len(over) == len(trials):
        smallest = min((t for t in trials if t.estimated_bytes is not None), key=lambda t: t.estimated_bytes)
        raise ConfigError([(KEY, f"{format_size(limit)} leaves no trial to run: the smallest estimate is "
                                 f"{format_size(smallest.estimated_bytes)} (trial '{smallest.label}')")])
    return [(t, over[t.key]) for t in trials if t.key in over]


def notes(trials: list, groups: list, limit: int) -> list[str]:
    """What the plan says about the limit: the trials the estimator cannot size (an unknown
    architecture), run but not checked; and each searched bound (each choice, each end of a
    range) whose draw alone exceeds the limit: such draws will fail as trials of their own."""
    from orchestrator import search

    lines = [f"trial '{t.label}': no memory estimate, not checked against {KEY}"
             for t in trials if t.estimated_bytes is None]
    for group in groups:
        for key, dim in group.space.items():
            for value in dim.bounds():
                estimated = estimate_bytes(search.apply_sample(group.raw, {key: value}))
                if estimated is not None and estimated > limit:
                    lines.append(f"search of '{group.label}': {key}={value!r} is estimated at {format_size(estimated)}"
                                 f" > {KEY}={format_size(limit)}; draws over the limit fail as trials of their own")
    return lines


def estimate_bytes(cfg) -> int | None:
    """Per-worker memory to reserve (peak + runtime overhead), or None if the estimator cannot tell."""
    from trainers.memory import estimate

    try:
        return int(estimate(cfg, device="cuda" if cfg.train.use_gpu else "cpu").total_bytes)
    except (ValueError, OSError):
        return None


def draw_refusal(cfg, sweep) -> str | None:
    """Why a drawn trial may not run under sweep.memory_limit (its failure reason), or None."""
    limit = limit_bytes(sweep.memory_limit)
    if limit is None:
        return None
    estimated = estimate_bytes(cfg)
    if estimated is None or estimated <= limit:
        return None
    return (f"over {KEY}: estimated {format_size(estimated)} per worker (peak + runtime overhead) "
            f"> limit {format_size(limit)}")


# --------------------------------------------------------------------------- finished trials


def device_estimate(row) -> float | None:
    """A finished trial's estimated total: its logged mem/estimated_peak_bytes + the runtime
    overhead of its device; None when it logged no estimate."""
    from trainers.memory import RUNTIME_OVERHEAD

    peak = row.metric("mem/estimated_peak_bytes")
    if peak is None:
        return None
    device = "cuda" if str(row.params.get("train.use_gpu", "")).lower() == "true" else "cpu"
    return peak + RUNTIME_OVERHEAD[device]


def within(row, limit: int) -> bool:
    estimated = device_estimate(row)
    return estimated is not None and estimated <= limit


def sweep_limit(rows) -> int | None:
    """The sweep's own memory_limit, as its trials logged it (param sweep.memory_limit); None when
    unset or from before the key existed; an unparsable one (the plan refuses those) is None too."""
    for row in rows:
        try:
            limit = limit_bytes(row.params.get(KEY))
        except ConfigError:
            continue
        if limit is not None:
            return limit
    return None
