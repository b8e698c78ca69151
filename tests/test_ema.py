"""The sharded EMA against timm's ModelEmaV3 itself (decay rule with warmup, and the update)."""

from __future__ import annotations

import pytest
import torch
from timm.utils.model_ema import ModelEmaV3

from pretrain.config import EmaConfig
from pretrain.ema import ShardedEma, ema_decay
from pretrain.engine.deepspeed import Fragment

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("cfg", [
    EmaConfig(decay=0.9), EmaConfig(decay=0.999, warmup=True),
    EmaConfig(decay=0.99, warmup=True, warmup_power=0.75, warmup_gamma=3.0, min_decay=0.1, update_after_step=4),
], ids=["plain", "warmup", "warmup-gamma-min-delay"])
def test_decay_rule_is_timm_model_ema_v3(cfg):
    reference = ModelEmaV3(torch.nn.Linear(1, 1), decay=cfg.decay, min_decay=cfg.min_decay,
                           update_after_step=cfg.update_after_step, use_warmup=cfg.warmup,
                           warmup_gamma=cfg.warmup_gamma, warmup_power=cfg.warmup_power)
    for step in range(1, 200):
        assert ema_decay(cfg, step) == pytest.approx(reference.get_decay(step), abs=0, rel=1e-12), step


def test_sharded_update_equals_timm_on_the_full_weights():
    """Two 'ranks' each own half of every parameter; their EMAs put together equal timm's EMA."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    cfg = EmaConfig(decay=0.8, warmup=True, warmup_gamma=2.0)  # asymmetric: swapping decay and 1-decay fails
    reference = ModelEmaV3(model, decay=cfg.decay, use_warmup=True, warmup_gamma=2.0, warmup_power=cfg.warmup_power)
    flat = {name: p.detach().reshape(-1) for name, p in model.named_parameters()}
    shards = []
    for half in (0, 1):
        fragments = []
        for name, value in flat.items():
            cut = value.numel() // 2
            start, stop = (0, cut) if half == 0 else (cut, value.numel())
            fragments.append(Fragment(name, tuple(value.shape), start, stop - start, value[start:stop], {}, value))
        shards.append(ShardedEma(cfg, fragments))
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        reference.update(model, step=step)
        for shard in shards:
            shard.update(step)
    expected = dict(reference.module.named_parameters())
    for name in flat:
        parts = [t for shard in shards for f, t in zip(shard.fragments, shard.tensors) if f.name == name]
        torch.testing.assert_close(torch.cat(parts).view(expected[name].shape), expected[name].detach(),
                                   rtol=1e-6, atol=1e-7)
