import pytest
import torch

from dynnet.data import SineData, StepBatches


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
def test_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SineData(**kwargs)


def test_step_batches_cover_the_epoch_once():
    x, y = torch.zeros(3), torch.ones(3)
    batches = StepBatches(x, y, steps_per_epoch=250, steps_per_batch=100)
    assert len(batches) == 3
    assert [steps for _, _, steps in batches] == [100, 100, 50]
    assert all(bx is x and by is y for bx, by, _ in batches)  # the same tensors: nothing is copied per step


def test_full_batch_is_the_tutorial_data():
    data = SineData()
    data.setup("fit")
    x, y = next(iter(data.val_dataloader()))
    assert torch.equal(x, torch.linspace(-torch.pi, torch.pi, 2000))
    assert torch.equal(y, torch.sin(x))
