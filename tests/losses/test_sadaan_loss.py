import math

import pytest
import torch

from medseg.losses.sadaan import TERMS, SADAANLoss
from medseg.models.sadaan import SADAANOutput

DEFAULT_WEIGHTS = dict(segmentation=1.0, dice=2.0, focal_seg=1.0, absence=1.0,
                       attention_supervision=0.5, false_positive_suppression=0.5, confidence=0.1)


def labels() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 8^3 cases, three structures; structure 2 is absent from both, structure 1 from case 1."""
    masks = torch.zeros(2, 3, 8, 8, 8)
    masks[:, 0, 1:4, 1:4, 1:4] = 1
    masks[0, 1, 4:7, 4:7, 4:7] = 1
    presence = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return masks, presence


def random_output(masks: torch.Tensor, requires_grad: bool = False) -> SADAANOutput:
    torch.manual_seed(0)
    batch, structures = masks.shape[:2]
    output = SADAANOutput(
        segmentation=torch.randn(masks.shape),
        attention=torch.rand(masks.shape) * 0.98 + 0.01,
        presence=torch.randn(batch, structures),
        confidence=torch.rand(batch, structures) * 0.98 + 0.01,
    )
    return SADAANOutput(*(tensor.requires_grad_(requires_grad) for tensor in output))


def perfect_output(masks: torch.Tensor, presence: torch.Tensor) -> SADAANOutput:
    return SADAANOutput(segmentation=(masks * 2 - 1) * 30, attention=masks.clamp(0.01, 0.99),
                        presence=(presence * 2 - 1) * 30,
                        confidence=torch.full_like(presence, 0.99))


def test_terms_are_the_seven_named_non_negative_and_sum_to_the_total():
    masks, presence = labels()
    total, terms = SADAANLoss()(random_output(masks), masks, presence)

    assert tuple(terms) == TERMS
    assert all(value.ndim == 0 and value >= 0 for value in terms.values())
    expected = sum(DEFAULT_WEIGHTS[name] * value for name, value in terms.items())
    torch.testing.assert_close(total, expected)


def test_every_output_receives_gradient():
    masks, presence = labels()
    output = random_output(masks, requires_grad=True)
    total, terms = SADAANLoss()(output, masks, presence)
    total.backward()

    assert all(not value.requires_grad for value in terms.values())
    for name, tensor in output._asdict().items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", TERMS)
def test_zero_weight_removes_the_term_and_changes_the_total(name):
    masks, presence = labels()
    output = random_output(masks)
    full_total, _ = SADAANLoss()(output, masks, presence)
    total, terms = SADAANLoss(**{name: 0.0})(output, masks, presence)

    assert name not in terms
    assert set(terms) == set(TERMS) - {name}
    assert total < full_total


def test_switched_off_attention_supervision_leaves_attention_out_of_the_graph():
    masks, presence = labels()
    output = random_output(masks, requires_grad=True)
    total, _ = SADAANLoss(attention_supervision=0.0)(output, masks, presence)
    total.backward()
    assert output.attention.grad is None


def test_absent_structure_prediction_is_suppressed():
    masks, presence = labels()
    clean = perfect_output(masks, presence)
    blob = clean.segmentation.clone()
    blob[1, 2, 5:8, 5:8, 5:8] = 5.0  # structure 2 is absent from case 1
    noisy = clean._replace(segmentation=blob)
    loss = SADAANLoss()

    _, clean_terms = loss(clean, masks, presence)
    _, noisy_terms = loss(noisy, masks, presence)
    assert clean_terms["false_positive_suppression"] < 1e-6
    # One of the three absent (case, structure) pairs is confidently wrong.
    assert noisy_terms["false_positive_suppression"] > 0.3


def test_perfect_prediction_has_near_zero_mask_and_presence_terms():
    masks, presence = labels()
    _, terms = SADAANLoss()(perfect_output(masks, presence), masks, presence)
    for name in ("segmentation", "dice", "focal_seg", "absence", "false_positive_suppression"):
        assert terms[name] < 1e-5, name


def test_dice_ignores_absent_structures():
    masks, presence = labels()
    perfect = perfect_output(masks, presence)
    everywhere = perfect.segmentation.clone()
    everywhere[1, 1] = 30.0  # structure 1 is absent from case 1
    _, terms = SADAANLoss()(perfect._replace(segmentation=everywhere), masks, presence)
    assert terms["dice"] < 1e-5
    assert terms["false_positive_suppression"] > 0.3


def test_attention_must_cover_the_structure_with_a_margin():
    masks, presence = labels()
    output = perfect_output(masks, presence)
    margin = torch.nn.functional.max_pool3d(masks, kernel_size=5, stride=1, padding=2)
    covering = torch.where(margin > 0, 0.99, 0.01)
    loss = SADAANLoss(attention_margin=2)

    def supervision(attention: torch.Tensor) -> float:
        _, terms = loss(output._replace(attention=attention), masks, presence)
        return terms["attention_supervision"]

    assert supervision(covering) < 0.05
    assert supervision(covering.roll(shifts=(4, 4), dims=(-1, -2))) > 0.5
    assert supervision(torch.where(masks > 0, 0.99, 0.01)) > 0.5  # too tight: no margin


def test_confidence_that_matches_the_achieved_quality_scores_better():
    masks, presence = labels()
    perfect = perfect_output(masks, presence)
    loss = SADAANLoss()
    sure = loss(perfect._replace(confidence=torch.full_like(presence, 0.99)), masks, presence)[1]
    unsure = loss(perfect._replace(confidence=torch.full_like(presence, 0.01)), masks, presence)[1]
    assert sure["confidence"] < 1e-3 < 0.5 < unsure["confidence"]


@pytest.mark.parametrize("presence_value", [0.0, 1.0])
def test_all_absent_and_all_present_batches_are_finite(presence_value):
    masks, _ = labels()
    presence = torch.full((2, 3), presence_value)
    masks = masks.clone()
    if presence_value:
        masks[:, :, 0, 0, 0] = 1
    else:
        masks.zero_()
    output = random_output(masks, requires_grad=True)
    total, terms = SADAANLoss()(output, masks, presence)
    total.backward()

    assert math.isfinite(total.item())
    assert all(math.isfinite(value.item()) for value in terms.values())
    assert all(torch.isfinite(tensor.grad).all() for tensor in output)
    empty = "false_positive_suppression" if presence_value else "dice"
    assert terms[empty] == 0


def test_a_loss_of_only_empty_terms_still_back_propagates():
    masks, _ = labels()
    output = random_output(masks.zero_(), requires_grad=True)
    weights = {name: 0.0 for name in TERMS} | {"dice": 1.0}
    total, _ = SADAANLoss(**weights)(output, masks, torch.zeros(2, 3))
    total.backward()
    assert total.item() == 0


def test_bf16_autocast_gives_a_finite_float32_loss():
    masks, presence = labels()
    output = SADAANOutput(*(tensor.to(torch.bfloat16) for tensor in random_output(masks)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = SADAANLoss()(output, masks, presence)
    assert total.dtype == torch.float32
    assert math.isfinite(total.item())
    assert all(value.dtype == torch.float32 for value in terms.values())


def test_negative_weight_names_the_term():
    with pytest.raises(ValueError, match="false_positive_suppression"):
        SADAANLoss(false_positive_suppression=-0.1)


def test_all_zero_weights_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        SADAANLoss(**{name: 0.0 for name in TERMS})


def test_mismatched_masks_are_a_clear_error():
    masks, presence = labels()
    with pytest.raises(ValueError, match=r"masks of shape \(2, 3, 4, 8, 8\)"):
        SADAANLoss()(random_output(masks), masks[:, :, :4], presence)


# ----------------------------------------------------------------------------- absence balance
def test_balanced_absence_weighs_a_rare_absence_as_much_as_the_common_presence():
    # Structure 0 is present in 90 % of the training cases: "always present" is right 9 times
    # in 10, so plain BCE barely pays for it; balanced, the absent cases carry half the term.
    rate = torch.tensor([0.9])
    balanced = SADAANLoss(segmentation=0, dice=0, focal_seg=0, absence=1,
                          attention_supervision=0, false_positive_suppression=0, confidence=0,
                          presence_rate=rate)
    plain = SADAANLoss(segmentation=0, dice=0, focal_seg=0, absence=1,
                       attention_supervision=0, false_positive_suppression=0, confidence=0)
    presence = torch.tensor([[1.0]] * 9 + [[0.0]])
    masks = presence[:, :, None, None, None].expand(10, 1, 4, 4, 4).clone()
    always_present = SADAANOutput(segmentation=torch.zeros(masks.shape),
                                  attention=torch.full(masks.shape, 0.5),
                                  presence=torch.full((10, 1), 3.0), confidence=torch.ones(10, 1))
    plain_loss = float(plain(always_present, masks, presence)[0])
    balanced_loss = float(balanced(always_present, masks, presence)[0])
    p = torch.sigmoid(torch.tensor(3.0))
    expected = (9 * (0.5 / 0.9) * -math.log(p) + (0.5 / 0.1) * -math.log(1 - p)) / 10
    assert balanced_loss == pytest.approx(expected, rel=1e-5)
    assert balanced_loss > 3 * plain_loss


def test_a_structure_always_present_in_training_keeps_plain_weights():
    masks, presence = labels()
    output = random_output(masks)
    plain = SADAANLoss(**DEFAULT_WEIGHTS)(output, masks, presence)[1]["absence"]
    same = SADAANLoss(**DEFAULT_WEIGHTS, presence_rate=torch.tensor([1.0, 0.0, 1.0]))(
        output, masks, presence)[1]["absence"]
    assert float(same) == pytest.approx(float(plain))


@pytest.mark.parametrize("rate, message", [([0.5, 1.5, 0.5], "shares in \\[0, 1\\]"),
                                           ([0.5, 0.5], "has 2 structures")])
def test_presence_rates_that_do_not_fit_are_refused(rate, message):
    masks, presence = labels()
    with pytest.raises(ValueError, match=message):
        SADAANLoss(**DEFAULT_WEIGHTS, presence_rate=torch.tensor(rate))(
            random_output(masks), masks, presence)
