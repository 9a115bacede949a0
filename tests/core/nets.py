"""Helpers shared by the bound tests: small random nets with deterministic weights."""
import torch
from torch import nn

DTYPE = torch.float64  # exact comparisons without float32 rounding flakiness


def random_init(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Deterministic weights from `gen`, scaled so activations stay O(1) and ReLUs switch."""
    model = model.to(DTYPE)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen, dtype=DTYPE)
                                    * 1.5 / fan_in ** 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=DTYPE) * 0.2)
    return model
