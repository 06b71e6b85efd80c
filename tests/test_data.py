from types import SimpleNamespace

import pytest
import torch

from dynnet.data import SineData, TrainItems


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_points": 1}, "n_points must be at least 2, got 1"),
        ({"low": 1.0, "high": 1.0}, "low must be below high and both finite, got low=1.0 and high=1.0"),
        ({"low": float("nan")}, "low must be below high and both finite, got low=nan"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be at least 1, got 0"),
        ({"steps_per_batch": 0}, "steps_per_batch must be at least 1, got 0"),
    ],
)
def test_bad_sinedata_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SineData(**kwargs)


def items(global_step: int, max_steps: int, steps_per_epoch: int, steps_per_batch: int) -> list[tuple[int, int]]:
    """(first step, steps) of every item one epoch of the train loader yields from global_step."""
    x, y = torch.zeros(3), torch.ones(3)
    trainer = SimpleNamespace(global_step=global_step, max_steps=max_steps)
    loader = TrainItems(x, y, trainer, steps_per_epoch, (steps_per_batch,))
    batches = list(loader)
    assert all(bx is x and by is y for bx, by, _, _ in batches)  # the same tensors: nothing is copied per step
    return [(first, steps) for _, _, first, steps in batches]


def test_items_cover_an_epoch_on_the_grid():
    assert items(0, 1000, 250, 100) == [(0, 100), (100, 100), (200, 50)]
    assert items(250, 1000, 250, 100) == [(250, 50), (300, 100), (400, 100)]  # the epoch ends at step 500


def test_a_resumed_run_first_finishes_its_item():
    assert items(130, 1000, 250, 100) == [(130, 70), (200, 50)]


def test_an_item_ends_at_max_steps_and_the_epoch_goes_on():
    # Lightning stops at max_steps (170); the loader, as any loader, would go on to the epoch's end.
    assert items(0, 170, 250, 100) == [(0, 100), (100, 70), (170, 30), (200, 50)]
    assert items(170, 170, 250, 100) == [(170, 30), (200, 50)]


def test_full_batch_is_the_tutorial_data():
    data = SineData()
    data.setup("fit")
    x, y = next(iter(data.val_dataloader()))
    assert torch.equal(x, torch.linspace(-torch.pi, torch.pi, 2000))
    assert torch.equal(y, torch.sin(x))
