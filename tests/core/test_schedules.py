import pytest

from workers.core.config import RunConfig, resolve
from workers.core.methods import METHODS
from workers.core.schedules import exponential_lr, ramp, step_lr
from workers.core.train import learning_rate, train_eps


def test_ramp_shape():
    values = [ramp(t, begin=2, length=4, start=1.0, end=0.5) for t in (0, 2, 3, 4, 6, 9)]
    assert values == [1.0, 1.0, 0.875, 0.75, 0.5, 0.5]
    assert ramp(5, begin=2, length=0, start=0.0, end=1.0) == 1.0


def test_ibp_paper_curriculum_on_the_mnist_protocol():
    """100 epochs of 600 steps: eps 0 until step 2K, linear to eps_train at 12K; kappa 1 -> 0.5 over
    the same window; lr 1e-3, x0.1 at steps 15K and 25K (IBP paper, appendix A)."""
    config = resolve(RunConfig(method="ibp", dataset="mnist", epochs=100, eps=0.3, eps_train=0.4))
    method = METHODS.get("ibp")(config)
    per_epoch = 600

    def at(step):
        return step / per_epoch

    assert train_eps(config, at(1999)) == 0.0
    assert train_eps(config, at(7000)) == pytest.approx(0.2, abs=1e-4)
    assert train_eps(config, at(12000)) == pytest.approx(0.4)
    assert train_eps(config, at(50000)) == pytest.approx(0.4)
    assert method.kappa(at(1000)) == 1.0
    assert method.kappa(at(7000)) == pytest.approx(0.75, abs=1e-4)
    assert method.kappa(at(30000)) == 0.5
    assert learning_rate(config, at(14999)) == pytest.approx(1e-3)
    assert learning_rate(config, at(15000)) == pytest.approx(1e-4)
    assert learning_rate(config, at(25000)) == pytest.approx(1e-5)
    # the eps ramp is linear and never decreases
    eps = [train_eps(config, at(s)) for s in range(0, 60000, 500)]
    assert eps == sorted(eps)


def test_learning_rate_schedules():
    assert step_lr(0.5, lr=1.0, milestones=[1, 2], factor=0.5) == 1.0
    assert step_lr(2.0, lr=1.0, milestones=[1, 2], factor=0.5) == 0.25
    # Local-Lip Eq. 27: constant until m, then geometric to end_lr at T
    assert exponential_lr(100, lr=1e-3, total=300, decay_start=150, end_lr=5e-6) == 1e-3
    assert exponential_lr(300, lr=1e-3, total=300, decay_start=150, end_lr=5e-6) == pytest.approx(5e-6)
    middle = exponential_lr(225, lr=1e-3, total=300, decay_start=150, end_lr=5e-6)
    assert middle == pytest.approx((1e-3 * 5e-6) ** 0.5)
