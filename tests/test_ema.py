"""The weights' moving average: its warm-up, its buffers, and its count through a checkpoint."""
import torch
from torch import nn

from dist_lc.ema import EMA


def test_the_first_update_copies_then_each_mixes_in_its_warm_up_share_and_integer_buffers_are_copied():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    ema = EMA(net, decay=0.98)
    states = []
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 2, 5, 5))   # moves the running statistics, counts a batch
        states.append({k: v.clone() for k, v in net.state_dict().items()})
        ema.update(net)
    expected = states[0]["0.weight"]
    for n, state in ((1, states[1]), (2, states[2])):
        keep = min(0.98, (1 + n) / (10 + n))
        expected = expected * keep + state["0.weight"] * (1 - keep)
    torch.testing.assert_close(ema.module.state_dict()["0.weight"], expected)
    assert ema.updates == 3 and int(ema.module.state_dict()["1.num_batches_tracked"]) == 3
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_a_loaded_average_goes_on_from_its_count():
    net = nn.Linear(2, 2)
    a, b = EMA(net, 0.9), EMA(net, 0.9)
    for _ in range(4):
        a.update(net)
    b.load(a.module.state_dict(), a.updates)
    with torch.no_grad():
        net.weight.add_(1.0)
    a.update(net)
    b.update(net)
    assert torch.equal(a.module.weight, b.module.weight) and b.updates == 5
