import pytest
import torch

from medseg.losses.sadaan import SADAANLoss
from medseg.models.sadaan import SADAAN, SADAANOutput


def tiny_model(num_structures: int = 3, **overrides) -> SADAAN:
    torch.manual_seed(0)
    arguments = dict(num_structures=num_structures, base_channels=4, num_levels=3,
                     prior_grid=(4, 4, 2))
    return SADAAN(**{**arguments, **overrides})


def two_structure_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 16^3 cases: structure 0 in both, structure 1 only in the first, different intensities."""
    torch.manual_seed(0)
    masks = torch.zeros(2, 2, 16, 16, 16)
    masks[:, 0, 2:7, 3:9, 4:10] = 1
    masks[0, 1, 9:14, 8:13, 2:8] = 1
    presence = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    image = masks[:, :1] + 2.0 * masks[:, 1:] + 0.1 * torch.randn(2, 1, 16, 16, 16)
    return image, masks, presence


def test_output_shapes_and_ranges():
    output = tiny_model()(torch.randn(2, 1, 16, 16, 32))

    assert isinstance(output, SADAANOutput)
    assert output.segmentation.shape == (2, 3, 16, 16, 32)
    assert output.attention.shape == (2, 3, 16, 16, 32)
    assert output.presence.shape == (2, 3)
    assert output.confidence.shape == (2, 3)
    assert ((output.attention > 0) & (output.attention < 1)).all()
    assert ((output.confidence > 0) & (output.confidence < 1)).all()
    assert all(torch.isfinite(tensor).all() for tensor in output)


def test_default_model_runs_at_two_resolutions_with_the_same_priors():
    model = SADAAN(num_structures=2, base_channels=2).eval()
    with torch.no_grad():
        small = model(torch.randn(1, 1, 32, 32, 32))
        large = model(torch.randn(1, 1, 64, 64, 32))

    assert model.attention.position_prior.shape == (2, 8, 8, 4)
    assert small.segmentation.shape == (1, 2, 32, 32, 32)
    assert large.attention.shape == (1, 2, 64, 64, 32)


def test_multichannel_input():
    output = tiny_model(in_channels=3)(torch.randn(1, 3, 16, 16, 16))
    assert output.segmentation.shape == (1, 3, 16, 16, 16)


@pytest.mark.parametrize("shape, message", [
    ((1, 2, 16, 16, 16), r"\[B, 1, H, W, D\], got \(1, 2, 16, 16, 16\)"),
    ((1, 16, 16, 16), r"got \(1, 16, 16, 16\)"),
    ((1, 1, 16, 18, 16), r"divisible by 4; got an input of shape \(1, 1, 16, 18, 16\)"),
])
def test_bad_input_shape_is_a_clear_error(shape, message):
    with pytest.raises(ValueError, match=message):
        tiny_model()(torch.randn(*shape))


def test_single_voxel_bottleneck_is_a_clear_error():
    with pytest.raises(ValueError, match="single-voxel bottleneck"):
        SADAAN(num_structures=2, base_channels=2)(torch.randn(1, 1, 16, 16, 16))


@pytest.mark.parametrize("arguments", [dict(num_levels=1), dict(num_structures=0),
                                       dict(prior_grid=(8, 8)), dict(dropout=1.0)])
def test_bad_constructor_arguments(arguments):
    with pytest.raises(ValueError):
        SADAAN(**arguments)


def test_position_priors_learn_and_steer_attention_and_masks():
    model = tiny_model()
    image, _, _ = two_structure_batch()
    masks = torch.zeros(2, 3, 16, 16, 16)
    masks[:, 0, :8] = 1
    presence = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])

    loss, _ = SADAANLoss()(model(image), masks, presence)
    loss.backward()
    prior = model.attention.position_prior
    assert prior.grad is not None and prior.grad[0].abs().sum() > 0

    model.eval()
    with torch.no_grad():
        before = model(image)
        prior[0] += 3.0
        after = model(image)
    assert (after.attention[:, 0] > before.attention[:, 0]).all()
    assert (after.segmentation[:, 0] > before.segmentation[:, 0]).all()
    torch.testing.assert_close(after.attention[:, 1:], before.attention[:, 1:])


def test_tiny_model_overfits_a_tiny_batch():
    image, masks, presence = two_structure_batch()
    model = tiny_model(num_structures=2, base_channels=8)  # 4 channels can get stuck on a structure
    loss_fn = SADAANLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    losses = []
    for _ in range(40):
        output = model(image)
        loss, _ = loss_fn(output, masks, presence)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    model.eval()
    with torch.no_grad():
        output = model(image)
    predicted = (output.segmentation > 0).float()
    overlap = (predicted * masks).sum((2, 3, 4))
    dice = 2 * overlap / (predicted.sum((2, 3, 4)) + masks.sum((2, 3, 4))).clamp_min(1)
    assert losses[-1] < 0.3 * losses[0]
    assert (dice[presence.bool()] > 0.8).all()
    assert torch.equal(output.presence > 0, presence.bool())


def test_eval_mode_is_deterministic():
    model = tiny_model(dropout=0.2).eval()
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        first, second = model(image), model(image)
    torch.testing.assert_close(first.segmentation, second.segmentation)


@pytest.mark.parametrize("prior", [0.01, 0.1])
def test_masks_start_at_the_foreground_prior(prior):
    torch.manual_seed(0)
    model = SADAAN(num_structures=3, base_channels=4, num_levels=3, foreground_prior=prior).eval()
    with torch.no_grad():
        probabilities = torch.sigmoid(model(torch.randn(2, 1, 16, 16, 16)).segmentation)
    assert prior / 3 < float(probabilities.mean()) < prior * 3
