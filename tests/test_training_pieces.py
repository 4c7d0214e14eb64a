"""Training helpers: non-finite steps are skipped and never reach the weights; data order is a function of step."""

import pytest
import torch
from torch import nn

from latentdiff.data.buckets import batch_indices
from latentdiff.train.common import EMA, NonFiniteSkipper


def test_non_finite_loss_skips_the_step_then_stops_the_run():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    skipper = NonFiniteSkipper(limit=2)
    nan_loss = model(torch.tensor([[float("nan"), 1.0]])).sum()
    assert skipper.step(nan_loss, 0, opt, model, grad_clip=1.0) is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    good = skipper.step(model(torch.ones(1, 2)).sum(), 1, opt, model, grad_clip=1.0)
    assert good is not None and good > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(RuntimeError, match="non-finite for 2 steps"):
        skipper.step(model(torch.tensor([[float("inf"), 1.0]])).sum(), 2, opt, model, grad_clip=1.0)


def test_batch_indices_cover_each_epoch_once_and_depend_only_on_step():
    n, batch = 10, 4
    seen = torch.cat([batch_indices(step, batch, n, seed=3) for step in range(5)])  # 20 items = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(3, batch, n, seed=3), batch_indices(3, batch, n, seed=3))
    assert not torch.equal(seen[:10], torch.cat([batch_indices(s, batch, n, seed=4) for s in range(5)])[:10])


def test_ema_tracks_weights_with_its_decay():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.module.weight.fill_(0.0)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(0.5)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(0.75)
