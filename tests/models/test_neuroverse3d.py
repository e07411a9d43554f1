"""Neuroverse3D: the forward contract and the mini-context mechanism."""

import pytest
import torch

from medseg.models.neuroverse3d import Neuroverse3D, mini_context_groups, scale_gradient

SIZE = 16


def tiny(**kwargs) -> Neuroverse3D:
    torch.manual_seed(0)
    return Neuroverse3D(channels=[4, 8, 16], **kwargs)


def episode(batch=1, context=5, size=SIZE, seed=1):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 1, size, size, size, generator=g)
    images = torch.rand(batch, context, 1, size, size, size, generator=g)
    labels = (torch.rand(batch, context, 1, size, size, size, generator=g) > 0.7).float()
    return target, images, labels


def test_parameter_count_of_the_original_channels():
    # Demo.ipynb of the original prints "Total number of parameters: 70854913".
    net = Neuroverse3D()
    assert sum(p.numel() for p in net.parameters()) == 70_854_913


def test_output_shape_batch_and_context():
    net = tiny().eval()
    target, images, labels = episode(batch=2, context=3)
    with torch.no_grad():
        out = net(target, images, labels, gs=2)
    assert out.shape == (2, 1, SIZE, SIZE, SIZE)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_prediction_does_not_depend_on_gs(mode):
    net = tiny()
    getattr(net, mode)()  # train mode shuffles the group order as well
    target, images, labels = episode(context=7)
    with torch.no_grad():
        outputs = [net(target, images, labels, gs=gs) for gs in range(1, 9)]
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-5, atol=1e-6)


def test_running_mean_is_exact_with_an_uneven_last_group():
    net = tiny().eval()
    target, images, labels = episode(context=5)  # gs=2: groups of 2, 2, 1
    assert mini_context_groups(5, 2) == [(0, 2), (2, 4), (4, 5)]
    with torch.no_grad():
        skips, _ = net.target_encoder(target)
        fused = net.context_means(skips, images, labels, gs=2)
        full = net.context_unet(torch.cat([images, labels], dim=2), skips)
    assert len(fused) == len(full) == 3
    for got, features in zip(fused, full):
        torch.testing.assert_close(got, features.mean(dim=1), rtol=1e-6, atol=1e-7)
    # A size-weighted fold, not a mean of group means (which would weigh the last pair double).
    group_means = torch.stack([full[0][:, 0:2].mean(1), full[0][:, 2:4].mean(1), full[0][:, 4:5].mean(1)])
    assert not torch.allclose(fused[0], group_means.mean(0), atol=1e-6)


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_one_group_gradient_equals_the_full_graph_gradient():
    net = tiny().train()
    target, images, labels = episode(context=3)
    net.zero_grad()
    net(target, images, labels, gs=3).square().mean().backward()
    mechanism = _grads(net)

    net.zero_grad()  # the same network written as one graph, without mini-contexts
    skips, bottom = net.target_encoder(target)
    features = net.context_unet(torch.cat([images, labels], dim=2), skips)
    net.target_decoder(bottom, [f.mean(1) for f in features], skips).square().mean().backward()
    reference = _grads(net)

    assert set(mechanism) == set(reference) == {n for n, _ in net.named_parameters()}
    for name in reference:
        torch.testing.assert_close(mechanism[name], reference[name], rtol=1e-5, atol=1e-8)


def test_only_the_last_group_back_propagates_scaled_by_the_group_count():
    net = tiny(shuffle_groups=False).train()
    target, images, labels = episode(context=4)
    images.requires_grad_(True)
    net(target, images, labels, gs=2).sum().backward()
    assert images.grad[:, :2].abs().sum() == 0  # first group: no graph
    assert images.grad[:, 2:].abs().sum() > 0
    x = torch.ones(3, requires_grad=True)
    (scale_gradient(x, 4.0) * 2).sum().backward()
    assert x.grad.tolist() == [8.0, 8.0, 8.0]


def test_context_on_cpu_is_moved_group_by_group(monkeypatch):
    net = tiny().eval()
    target, images, labels = episode(context=4)
    seen = []
    original = net.context_unet.forward
    monkeypatch.setattr(net.context_unet, "forward",
                        lambda pairs, skips: seen.append(pairs.shape[1]) or original(pairs, skips))
    with torch.no_grad():
        net(target, images, labels, gs=3)
    assert seen == [3, 1] or seen == [1, 3]


@pytest.mark.parametrize("gs", [0, -1, 1.5])
def test_bad_gs_is_named(gs):
    net = tiny().eval()
    target, images, labels = episode(context=2)
    with pytest.raises(ValueError, match="gs must be an integer >= 1"):
        net(target, images, labels, gs=gs)


def test_empty_context_is_named():
    net = tiny().eval()
    target, images, labels = episode(context=2)
    with pytest.raises(ValueError, match="at least one pair"):
        net(target, images[:, :0], labels[:, :0])


def test_size_not_a_multiple_is_named():
    net = tiny().eval()
    target, images, labels = episode(context=1, size=18)
    with pytest.raises(ValueError, match="multiple of 4"):
        net(target, images, labels)
