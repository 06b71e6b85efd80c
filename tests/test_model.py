import math
import random

import pytest
import torch

from dynnet.model import DynamicPolynomial, ExpectedLoss, design


@pytest.fixture
def x():
    return torch.linspace(-math.pi, math.pi, 2000, dtype=torch.float64)


@pytest.mark.parametrize("degree", [3, 4, 5])
def test_polynomial_matches_formula(x, degree):
    model = DynamicPolynomial().double()
    a, b, c, d, e = model.flat().tolist()
    expected = a + b * x + c * x**2 + d * x**3 + (e * x**4 if degree >= 4 else 0) + (e * x**5 if degree == 5 else 0)
    torch.testing.assert_close(model(x, degree), expected, rtol=1e-12, atol=1e-12)


def test_other_degree_ranges_give_their_polynomials(x):
    model = DynamicPolynomial(min_degree=1, max_degree=3).double()
    a, b, s = model.flat().tolist()
    torch.testing.assert_close(model(x, 3), a + b * x + s * x**2 + s * x**3, rtol=1e-12, atol=1e-12)
    constant = DynamicPolynomial(min_degree=0, max_degree=0).double()
    assert torch.equal(constant(x), torch.full_like(x, constant.flat()[0].item()))


def test_degree_draws_are_uniform_and_follow_the_tutorial_seeding():
    model = DynamicPolynomial()
    model.rng.seed(11)
    draws = [model.draw_degree() for _ in range(30000)]
    random.seed(11)  # the tutorial: range(4, random.randint(4, 6)) adds 0, 1 or 2 shared terms to degree 3
    assert draws == [random.randint(4, 6) - 1 for _ in range(30000)]
    for degree in (3, 4, 5):
        assert abs(draws.count(degree) / len(draws) - 1 / 3) < 0.015
    model.rng.seed(11)
    assert [model.draw_degree() for _ in range(100)] == draws[:100]


@pytest.mark.parametrize("degree, powers", [(3, []), (4, [4]), (5, [4, 5])])
def test_shared_weight_gets_gradient_from_each_shared_power(x, degree, powers):
    model = DynamicPolynomial().double()
    y = torch.sin(x)
    loss = ((model(x, degree) - y) ** 2).sum()
    loss.backward()
    residual = (model(x, degree) - y).detach()
    expected = sum((2 * residual * x**p).sum() for p in powers) if powers else torch.tensor(0.0, dtype=x.dtype)
    grad = model.shared.grad if model.shared.grad is not None else torch.tensor(0.0, dtype=x.dtype)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9)


def direct_loss(theta, matrices, y):
    """The expected loss from the n x 5 design matrices themselves: the squared error averaged over degrees."""
    return ((matrices @ theta - y) ** 2).sum(-1).mean()


def test_expected_loss_and_optimum_against_the_design_matrices(x):
    y = torch.sin(x)
    matrices = design(x, 3, 5)
    expected = ExpectedLoss(x, y, 3, 5)
    theta = torch.tensor([0.3, -0.7, 0.1, 0.05, 0.002], dtype=torch.float64)
    torch.testing.assert_close(expected(theta), direct_loss(theta, matrices, y), rtol=1e-10, atol=0)
    # Independent route to the optimum: least squares on all degrees' design matrices stacked.
    stacked = torch.linalg.lstsq(matrices.reshape(-1, 5), y.repeat(3).unsqueeze(-1)).solution.squeeze(-1)
    best = expected.optimum()
    torch.testing.assert_close(best, stacked, rtol=1e-6, atol=1e-9)
    assert expected(best).item() == pytest.approx(8.7553, abs=1e-4)
    # A nudge in any direction raises the expected loss.
    for i in range(5):
        nudged = best.clone()
        nudged[i] += 1e-4
        assert expected(nudged) > expected(best)


def test_expected_loss_in_chunks_equals_in_one_piece(x, monkeypatch):
    y = torch.sin(x)
    whole = ExpectedLoss(x, y, 3, 5)
    monkeypatch.setattr(ExpectedLoss, "CHUNK", 7)  # 2000 points in 286 chunks
    chunked = ExpectedLoss(x, y, 3, 5)
    torch.testing.assert_close(chunked.gram, whole.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(chunked.optimum(), whole.optimum(), rtol=1e-9, atol=1e-12)


def test_largest_curvature_is_the_hessians_top_eigenvalue(x):
    y = torch.sin(x)
    matrices = design(x, 3, 5)
    hessians = [2 * m.T @ m for m in matrices]
    top = max(torch.linalg.eigvalsh(h).max().item() for h in hessians)
    assert ExpectedLoss(x, y, 3, 5).largest_curvature() == pytest.approx(top, rel=1e-9)


def test_formula_has_the_tutorial_format():
    model = DynamicPolynomial()
    a, b, c, d, e = (p.item() for p in model.flat())
    assert model.formula() == f"y = {a} + {b} x + {c} x^2 + {d} x^3 + {e} x^4 ? + {e} x^5 ?"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_degree": -1}, "min_degree must be between 0 and 24, got -1"),
        ({"min_degree": 6}, "min_degree must not exceed max_degree, got min_degree=6 and max_degree=5"),
        ({"max_degree": 10**10}, "max_degree must be at most 100, got 10000000000"),
    ],
)
def test_bad_degree_ranges_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicPolynomial(**kwargs)
