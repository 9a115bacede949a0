import pytest
from pydantic import ValidationError

from workers.core.config import RunConfig, config_hash, describe_errors, resolve


def errors(**fields) -> str:
    with pytest.raises(ValidationError) as caught:
        RunConfig(**fields)
    return "\n".join(describe_errors(caught.value))


@pytest.mark.parametrize("fields, expected", [
    ({"method": "magic"}, ["method: unknown method 'magic'", "ibp", "nominal", "pgd"]),
    ({"dataset": "imagenet21k"}, ["dataset: unknown dataset", "digits", "mnist"]),
    ({"model": "resnet9000"}, ["model: unknown model", "small", "4C3F"]),
    ({"norm": "l1"}, ["norm:", "'linf'", "'l2'", "'l1'"]),
    ({"eps": -0.1}, ["eps:", "greater than or equal to 0"]),
    ({"eps": 8.0}, ["eps: 8.0 is out of range", "[0, 1]"]),
    ({"method": "magic", "eps_train": 300}, ["unknown method", "eps_train: 300.0 is out of range"]),
    ({"eps": 2.0, "norm": "l2", "dataset": "toy2d", "model": "mlp3x100"}, ["[0, 1.41421]"]),
    ({"epochs": 0}, ["epochs:", "greater than or equal to 1"]),
    ({"certifiers": ["ibp", "oracle"]}, ["unknown certifier 'oracle'"]),
    ({"colour": "blue"}, ["colour: unknown field; allowed:", "method"]),
    ({"optimizer": {"lr": 1e-3, "momentun": 0.9}}, ["optimizer.momentun: unknown field", "momentum"]),
    ({"method_options": {"kappa": 0.5}}, ["method_options.kappa: unknown field; allowed: kappa_start"]),
    ({"method": "nominal", "method_options": {"steps": 3}}, ["method_options.steps: unknown field; allowed: none"]),
    ({"model": "small", "dataset": "toy2d"}, ["needs image input"]),
])
def test_bad_configs_name_the_field_and_the_allowed_values(fields, expected):
    message = errors(**fields)
    for part in expected:
        assert part in message, message


def test_resolve_fills_paper_defaults_and_is_idempotent():
    config = resolve(RunConfig(method="ibp", dataset="mnist", epochs=30, eps=0.2))
    assert config.eps_train == 0.2
    assert config.schedule.warmup_epochs == pytest.approx(1.0)
    assert config.schedule.rampup_epochs == pytest.approx(5.0)
    assert config.optimizer.lr_milestones == pytest.approx([7.5, 12.5])
    assert config.method_options == {"kappa_start": 1.0, "kappa_final": 0.5, "spec_loss": "ce",
                                     "elide": True}
    assert config.augment is False  # MNIST: no augmentation (IBP paper)
    assert resolve(config) == config
    assert resolve(RunConfig(dataset="cifar10", model="small")).augment is True
    assert config_hash(config) == config_hash(resolve(config.model_dump()))
    assert config_hash(config) != config_hash(config.model_copy(update={"seed": 1}))
