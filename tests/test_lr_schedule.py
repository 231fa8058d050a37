"""The learning rate each optimizer step of train_loop uses, for every train.scheduler, against
values worked out by hand: 20 steps, warmup_ratio 0.2 (4 warmup steps from 0), as fractions of
the peak train.lr."""

from __future__ import annotations

import pytest
import torch

from trainers.config import TrainConfig
from trainers.runtime import DistInfo
from trainers.tracking import Tracker
from trainers.training import train_loop

STEPS, WARMUP_RATIO, PEAK = 20, 0.2, 0.01
# lr of optimizer step k (1-based) -> k - 1 scheduler steps taken: warmup is 0, 1/4, 2/4, 3/4, then
# the decay runs over the 16 remaining steps (step 13 is halfway for cosine and linear alike).
EXPECTED = {
    "cosine": {2: 0.25, 3: 0.5, 5: 1.0, 13: 0.5, 9: 0.5 + 0.5 * 2 ** -0.5, 17: 0.5 - 0.5 * 2 ** -0.5},
    "linear": {3: 0.5, 5: 1.0, 9: 0.75, 13: 0.5, 17: 0.25, 20: 1 / 16},
    "constant": {3: 0.5, 5: 1.0, 13: 1.0, 20: 1.0},
}


class LrRecorder(Tracker):
    def __init__(self):
        self.after_step: dict[int, float] = {}

    def log_metrics(self, metrics, step=None):
        if step is not None:
            self.after_step[step] = metrics["train/lr"]


@pytest.mark.parametrize("scheduler", sorted(EXPECTED))
def test_each_step_uses_the_scheduled_learning_rate(scheduler):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    weights_at_forward: list[torch.Tensor] = []

    def loss_fn(model, batch):
        weights_at_forward.append(model.weight.detach().clone())
        return model(torch.tensor(batch)).pow(2).mean(), len(batch), {}

    train = TrainConfig(max_steps=STEPS, batch_size=2, lr=PEAK, warmup_ratio=WARMUP_RATIO, scheduler=scheduler,
                        optimizer="sgd", log_every=1, max_grad_norm=0.0)
    tracker = LrRecorder()
    examples = [[float(i), 1.0] for i in range(8)]
    train_loop(model, examples, train, 0, torch.device("cpu"), DistInfo(0, 1, 0), tracker, loss_fn=loss_fn)
    # train/lr logged after step k is the one step k + 1 uses; step 1's lr (0) leaves the weights as they were.
    applied = {step + 1: lr for step, lr in tracker.after_step.items()}
    assert torch.equal(weights_at_forward[0], weights_at_forward[1])
    assert not torch.equal(weights_at_forward[1], weights_at_forward[2])
    for step, fraction in EXPECTED[scheduler].items():
        assert applied[step] == pytest.approx(fraction * PEAK, abs=1e-12), (scheduler, step)
