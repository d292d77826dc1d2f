import copy

import pytest
import torch
from torch import nn

from actprune import (
    PruneConfig,
    PrunedLinear,
    prune_activations_,
    register_conversion,
    restore_dense_,
)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.mixers = nn.ModuleDict({"a": nn.Sequential(nn.Linear(16, 16), nn.ReLU())})
        self.head = nn.Linear(16, 4)
        self.shared = self.head  # one module under two names

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(self.mixers["a"](x))


def test_swaps_every_linear_sharing_parameters():
    model = Net()
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = PruneConfig(0.0, 8)
    assert prune_activations_(model, config) is model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears
    assert all(isinstance(m, PrunedLinear) and m.prune_config is config for m in linears)
    assert model.shared is model.head
    assert list(model.state_dict()) == keys_before
    for n, p in model.named_parameters():
        assert p is params_before[n]
    assert opt.param_groups[0]["params"][0] is model.blocks[0].fc1.weight


def test_converted_model_trains_like_dense_at_sparsity_zero():
    dense = Net()
    pruned = prune_activations_(copy.deepcopy(dense), PruneConfig(0.0, 8))
    x = torch.randn(6, 10, 16)
    dense(x).square().mean().backward()
    pruned(x).square().mean().backward()
    for (n, a), (_, b) in zip(dense.named_parameters(), pruned.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_filter_sees_qualified_names():
    model = Net()
    seen = []

    def only_fc1(name, module):
        seen.append(name)
        return name.endswith("fc1")

    prune_activations_(model, PruneConfig(0.5, 8), filter=only_fc1)
    assert "blocks.0.fc1" in seen and "mixers.a.0" in seen
    assert isinstance(model.blocks[1].fc1, PrunedLinear)
    assert type(model.blocks[1].fc2) is nn.Linear and type(model.head) is nn.Linear


def test_restore_dense_undoes_and_reapply_updates_config():
    model = Net()
    weight = model.blocks[0].fc2.weight
    prune_activations_(model, PruneConfig(0.5, 8))
    prune_activations_(model, PruneConfig(0.9, 4))
    assert model.blocks[0].fc2.prune_config == PruneConfig(0.9, 4)
    assert restore_dense_(model) is model
    assert not any(isinstance(m, PrunedLinear) for m in model.modules())
    assert type(model.blocks[0].fc2) is nn.Linear and model.blocks[0].fc2.weight is weight
    assert not hasattr(model.blocks[0].fc2, "config")


def test_root_linear_and_subclass_round_trip():
    class Plain(nn.Linear):  # subclass that keeps nn.Linear's forward
        pass

    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    root = prune_activations_(Plain(4, 4), PruneConfig(0.5, 2))
    assert isinstance(root, PrunedLinear)
    assert type(restore_dense_(root)) is Plain
    custom = Custom(4, 4)
    assert prune_activations_(custom, PruneConfig(0.5, 2)) is custom  # custom forward: untouched


def test_hooks_survive_conversion():
    model = Net()
    calls = []
    model.head.register_forward_hook(lambda m, i, o: calls.append(1))
    prune_activations_(model, PruneConfig(0.5, 8))
    model(torch.randn(2, 16))
    assert calls == [1]


def test_bad_config_type():
    with pytest.raises(TypeError, match="PruneConfig"):
        prune_activations_(Net(), {"sparsity": 0.5})


def test_include_and_exclude_patterns():
    model = Net()
    prune_activations_(model, PruneConfig(0.5, 8), include="blocks.*", exclude=["*.fc2"])
    assert isinstance(model.blocks[0].fc1, PrunedLinear) and isinstance(
        model.blocks[1].fc1, PrunedLinear
    )
    assert type(model.blocks[0].fc2) is nn.Linear and type(model.head) is nn.Linear
    assert type(model.mixers["a"][0]) is nn.Linear
    model = Net()
    prune_activations_(model, PruneConfig(0.5, 8), exclude="head", filter=lambda n, m: "1" not in n)
    assert isinstance(model.blocks[0].fc2, PrunedLinear) and type(model.blocks[1].fc2) is nn.Linear
    assert type(model.head) is nn.Linear and isinstance(model.mixers["a"][0], PrunedLinear)


class Gain(nn.Module):
    """A user's own per-channel layer, unknown to actprune until registered."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(dim))
        self.bias = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return torch.addcmul(self.bias, self.gain, x)


def test_registering_a_user_layer_converts_it_under_scope_all():
    from actprune import PrunedChannelScale, describe_compression, register_conversion

    model = nn.Sequential(nn.Linear(16, 32), Gain(32))
    dense = copy.deepcopy(model)
    prune_activations_(model, PruneConfig(0.5, 8, scope="all"))
    assert type(model[1]) is Gain  # not registered yet: left alone

    @register_conversion(Gain)
    class PrunedGain(PrunedChannelScale, Gain):
        param_names = ("gain", "bias")

    try:
        assert PrunedGain.dense_class is Gain
        prune_activations_(model, PruneConfig(0.0, 8, scope="all"))
        assert isinstance(model[1], PrunedGain) and model[1].gain is not None
        rows = describe_compression(model)
        assert {r["layer"] for r in rows if r["compressed"]} == {"Linear", "Gain"}
        x = torch.randn(4, 10, 16, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        out, want = model(x), dense(x2)
        assert torch.equal(out, want)  # forward exact
        out.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)  # dx exact
        for (name, a), (_, b) in zip(dense.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5, msg=name)  # s = 0
        prune_activations_(model, PruneConfig(0.5, 8, scope="linear"))
        assert type(model[1]) is Gain  # registered for scope "all" only
        prune_activations_(model, PruneConfig(0.5, 8, scope="all"))
        assert type(restore_dense_(model)[1]) is Gain
    finally:
        from actprune import convert

        convert._REGISTRY.pop(Gain)


def test_register_conversion_rejects_what_cannot_work():
    from actprune import PrunedChannelScale, register_conversion

    with pytest.raises(ValueError, match="scopes must be among"):
        register_conversion(Gain, scopes=("everything",))
    with pytest.raises(TypeError, match="must subclass an actprune layer base and Gain"):
        register_conversion(Gain)(nn.Linear)
    with pytest.raises(TypeError, match="dense_class is Linear"):

        @register_conversion(Gain)
        class Confused(PrunedChannelScale, Gain):
            dense_class = nn.Linear


def test_a_converted_container_gets_its_children_converted():
    """A registered block (a bare Parameter scale inside its forward, like timm's ResMLP block)
    converts, and so do its children, also when the block is the root."""
    from actprune import convert
    from actprune.layers import CompressedLayer, scale_channels

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.gain = nn.Parameter(torch.rand(8))

        def forward(self, x):
            return self.fc(x) * self.gain

    @register_conversion(Block)
    class PrunedBlock(CompressedLayer, Block):
        saved_for = "input of gain"

        def forward(self, x):
            return scale_channels(self.fc(x), self.gain, None, self.prune_config)

    try:
        config = PruneConfig(0.5, 4, scope="all")
        model = nn.Sequential(Block(), Block())
        x = torch.randn(6, 8)
        want = model(x)
        prune_activations_(model, config)
        assert all(type(b) is PrunedBlock and type(b.fc) is PrunedLinear for b in model)
        assert torch.equal(model(x), want)
        restore_dense_(model)
        assert all(type(b) is Block and type(b.fc) is nn.Linear for b in model)
        root = prune_activations_(Block(), config)
        assert type(root) is PrunedBlock and type(root.fc) is PrunedLinear
    finally:
        convert._REGISTRY.pop(Block, None)
