"""Segmentation building blocks: UperNet on ConvNeXt, losses against hand-computed values, mIoU metrics."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import DataConfig
from pretrain.data.batch import Batch
from pretrain.data.transforms import DeviceAugment
from pretrain.engine.distributed import free_port
from pretrain.evaluate import confusion_matrix, evaluate_segmentation, segmentation_scores
from pretrain.models import create_model
from pretrain.models.upernet import ConvNeXtUperNet, resize_to
from pretrain.objectives import (lovasz_softmax_loss, pixel_cross_entropy, segmentation_loss, soft_dice_loss,
                                 soft_iou_loss)

IGN = 255


def logits_of(probs) -> torch.Tensor:
    """(H, W, K) nested lists of probabilities -> logits (1, K, H, W) whose softmax is exactly them."""
    return torch.tensor(probs, dtype=torch.float64).log().permute(2, 0, 1)[None].float()


# --- model ---------------------------------------------------------------------------------------------

def test_upernet_atto_forward_backward_shapes_and_backbone_keys():
    torch.manual_seed(0)
    model = ConvNeXtUperNet(create_model("convnext_atto"), num_classes=5, channels=32, aux_channels=16)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == (2, 5, 16, 16) and out["aux"].shape == (2, 5, 4, 4)  # strides 4 and 16
    (out["out"].mean() + 0.4 * out["aux"].mean()).backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter takes part (DDP-safe)
    assert resize_to(out["out"], (64, 64)).shape == (2, 5, 64, 64)
    model.eval()
    with torch.no_grad():
        assert set(model(x)) == {"out"}

    # Backbone keys are the classification keys minus the head, so pretrained weights load by prefix.
    classifier = create_model("convnext_atto").state_dict()
    body = {k: v for k, v in classifier.items() if not k.startswith("head.")}
    assert set(model.backbone.state_dict()) == set(body)
    missing, unexpected = model.load_state_dict({f"backbone.{k}": v for k, v in body.items()}, strict=False)
    assert not unexpected and all(not k.startswith("backbone.") for k in missing)
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "out_norms", "decode_head",
                                                             "auxiliary_head"}
    # mmseg's UPerHead / FCNHead names (official checkpoints' decode_head.* / auxiliary_head.*).
    keys = set(model.state_dict())
    assert {"out_norms.3.weight", "decode_head.psp_modules.3.1.conv.weight",
            "decode_head.bottleneck.bn.running_mean", "decode_head.lateral_convs.2.conv.weight",
            "decode_head.fpn_convs.2.conv.weight", "decode_head.fpn_bottleneck.conv.weight",
            "decode_head.conv_seg.bias",
            "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.weight"} <= keys


def test_upernet_without_aux_has_no_aux_keys_or_output():
    model = ConvNeXtUperNet(create_model("convnext_atto"), num_classes=3, channels=16, aux=False)
    assert not any(k.startswith("auxiliary_head") for k in model.state_dict())
    assert set(model(torch.randn(2, 3, 32, 32))) == {"out"}


def test_upernet_convnext_tiny_parameter_count_matches_the_paper():
    with torch.device("meta"):
        model = ConvNeXtUperNet(create_model("convnext_tiny"), num_classes=150)  # ADE20K, widths 512 / 256
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6) == 60, n  # paper Table 3: UperNet ConvNeXt-T 60M (we get 60.24M, aux head included)


def test_batchnorm_runs_in_fp32_with_bf16_parameters_and_fp32_statistics():
    """DeepSpeed's bf16 mode casts parameters, not buffers: the head's BatchNorm must take that mix."""
    from pretrain.models.upernet import BatchNorm2d

    reference, bn = nn.BatchNorm2d(4), BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(bn(x), reference(x))
    assert torch.equal(bn.running_mean, reference.running_mean) and bn.num_batches_tracked == 1
    bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()
    y = bn(x.bfloat16())
    assert y.dtype == torch.bfloat16 and bn.running_var.dtype == torch.float32
    y.float().sum().backward()
    assert bn.weight.grad is not None and bn.weight.grad.dtype == torch.bfloat16


# --- losses ----------------------------------------------------------------------------------------------

# 2x2, 2 classes, one ignored pixel: p(class 0) = .8, .4 / .5 (ignored), .6.
P2 = [[[0.8, 0.2], [0.4, 0.6]], [[0.5, 0.5], [0.6, 0.4]]]
T2 = torch.tensor([[[0, 1], [IGN, 0]]])


def test_pixel_cross_entropy_by_hand_with_ignored_pixels_and_class_weights():
    logits = logits_of(P2)
    plain = -(math.log(.8) + math.log(.6) + math.log(.6)) / 3
    assert pixel_cross_entropy(logits, T2).item() == pytest.approx(plain)
    weighted = -(1 * math.log(.8) + 3 * math.log(.6) + 1 * math.log(.6)) / (1 + 3 + 1)
    assert pixel_cross_entropy(logits, T2, class_weights=[1.0, 3.0]).item() == pytest.approx(weighted)


def test_every_loss_is_zero_with_zero_gradients_when_every_pixel_is_ignored():
    logits = torch.randn(1, 3, 3, 3, requires_grad=True)
    target = torch.full((1, 3, 3), IGN)
    for loss in (pixel_cross_entropy, soft_dice_loss, soft_iou_loss, lovasz_softmax_loss):
        value = loss(logits, target)
        value.backward()
        assert value.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits)), loss.__name__
        logits.grad = None
    assert pixel_cross_entropy(logits, target, class_weights=[1.0, 2.0, 3.0]).item() == 0.0


def test_soft_dice_and_iou_by_hand_two_classes():
    # Valid pixels only: class 0: sum p*t = .8 + .6, sum p = .8 + .4 + .6, sum t = 2;
    #                    class 1: sum p*t = .6,      sum p = .2 + .6 + .4, sum t = 1.
    logits = logits_of(P2)
    dice = 1 - ((2 * 1.4 + 1) / (3.8 + 1) + (2 * 0.6 + 1) / (2.2 + 1)) / 2
    iou = 1 - ((1.4 + 1) / (3.8 - 1.4 + 1) + (0.6 + 1) / (2.2 - 0.6 + 1)) / 2
    assert soft_dice_loss(logits, T2).item() == pytest.approx(dice)
    assert soft_iou_loss(logits, T2).item() == pytest.approx(iou)
    assert soft_dice_loss(logits, T2, smooth=0).item() == pytest.approx(1 - (2.8 / 3.8 + 1.2 / 2.2) / 2)


def test_soft_dice_and_iou_average_over_classes_in_target_or_prediction():
    # 2x2, 3 classes; the ignored pixel's argmax (class 2) must not count, a valid pixel's argmax does.
    target = torch.tensor([[[0, 1], [1, IGN]]])
    false_positive = logits_of([[[.7, .2, .1], [.1, .3, .6]], [[.2, .7, .1], [.1, .1, .8]]])
    # class 0: I .7, sum p 1.0, sum t 1; class 1: I 1.0, sum p 1.2, sum t 2;
    # class 2: I 0, sum p .8, predicted at pixel (0, 1).
    dice = 1 - (1.4 / 2 + 2 / 3.2 + 0) / 3
    assert soft_dice_loss(false_positive, target, smooth=0).item() == pytest.approx(dice)
    iou = 1 - (.7 / 1.3 + 1 / 2.2 + 0) / 3
    assert soft_iou_loss(false_positive, target, smooth=0).item() == pytest.approx(iou)
    # Class 2 wins only the ignored pixel: mean over classes 0 and 1 (with smooth 0 class 2 would be 0/0).
    absent = logits_of([[[.7, .2, .1], [.1, .6, .3]], [[.2, .7, .1], [.1, .1, .8]]])
    # class 0: I .7, sum p 1.0, sum t 1; class 1: I 1.3, sum p 1.5, sum t 2.
    assert soft_dice_loss(absent, target, smooth=0).item() == pytest.approx(1 - (1.4 / 2 + 2.6 / 3.5) / 2)


def test_lovasz_softmax_by_hand():
    # Valid pixels t = 0, 0, 1 with p0 = .9, .4, .3 (the 4th pixel is ignored).
    # class 0: fg 1,1,0, errors .1,.6,.3 -> sorted .6(fg),.3(bg),.1(fg); gts 2; intersection 1,1,0;
    #   union 2,3,3; jaccard .5, 2/3, 1 -> grad .5, 1/6, 1/3 -> .6*.5 + .3/6 + .1/3.
    # class 1: fg 0,0,1, errors .1,.6,.3 -> sorted .6(bg),.3(fg),.1(bg); gts 1; intersection 1,0,0;
    #   union 2,2,3; jaccard .5, 1, 1 -> grad .5, .5, 0 -> .6*.5 + .3*.5.
    logits = logits_of([[[.9, .1], [.4, .6]], [[.3, .7], [.5, .5]]])
    target = torch.tensor([[[0, 0], [1, IGN]]])
    expected = ((.6 * .5 + .3 / 6 + .1 / 3) + (.6 * .5 + .3 * .5)) / 2
    assert lovasz_softmax_loss(logits, target).item() == pytest.approx(expected)


def test_segmentation_loss_combines_weighted_terms_in_fp32():
    logits = logits_of(P2).bfloat16().requires_grad_()
    weights = {"ce": 1.0, "dice": 0.5, "iou": 0.0}
    total, terms = segmentation_loss(logits, T2, weights, IGN, class_weights=[1, 3])
    assert set(terms) == {"ce", "dice"} and total.dtype == torch.float32
    assert terms["ce"].item() == pytest.approx(pixel_cross_entropy(logits, T2, class_weights=[1, 3]).item())
    assert total.item() == pytest.approx(terms["ce"].item() + 0.5 * soft_dice_loss(logits, T2).item())
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()
    with pytest.raises(ValueError, match="unknown"):
        segmentation_loss(logits, T2, {"focal": 1.0})
    with pytest.raises(ValueError, match="resize"):
        segmentation_loss(logits, torch.zeros(1, 4, 4, dtype=torch.long), {"ce": 1.0})


# --- metrics ---------------------------------------------------------------------------------------------

def test_confusion_matrix_and_scores_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, IGN], [0, IGN, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0], [2, 1, 2]])
    m = confusion_matrix(pred, target, 3, IGN)
    assert m.dtype == torch.int64
    assert m.tolist() == [[1, 1, 1], [0, 2, 0], [0, 0, 2]]  # rows true, columns predicted
    s = segmentation_scores(m)
    assert s["IoU"] == pytest.approx([1 / 3, 2 / 3, 2 / 3]) and s["mIoU"] == pytest.approx(5 / 9)
    assert s["aAcc"] == pytest.approx(5 / 7) and s["mAcc"] == pytest.approx((1 / 3 + 1 + 1) / 3)
    assert s["pixels"] == 7
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(pred, torch.full_like(target, 3), 3, IGN)


def test_scores_drop_classes_absent_from_target_and_prediction():
    # Class 1 absent from both (IoU NaN, dropped); class 3 predicted but absent (IoU 0, counted).
    m = torch.tensor([[2, 0, 1, 1], [0, 0, 0, 0], [0, 0, 3, 0], [0, 0, 0, 0]])
    s = segmentation_scores(m)
    assert s["IoU"][0] == pytest.approx(2 / 4) and math.isnan(s["IoU"][1]) and s["IoU"][3] == 0.0
    assert s["mIoU"] == pytest.approx((0.5 + 0.75 + 0) / 3)
    assert s["mAcc"] == pytest.approx((0.5 + 1) / 2)  # Acc is NaN for classes absent from the target
    assert s["aAcc"] == pytest.approx(5 / 7)
    empty = segmentation_scores(torch.zeros(3, 3, dtype=torch.int64))
    assert (empty["mIoU"], empty["mAcc"], empty["aAcc"], empty["pixels"]) == (0.0, 0.0, 0.0, 0.0)


@pytest.fixture
def process_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("as_dict", [True, False])
def test_evaluate_segmentation_resizes_logits_and_counts_over_ranks(process_group, as_dict):
    calls = []

    def forward(x):
        calls.append(tuple(x.shape))
        # (N, 2, 2, 2) at half resolution: the left column votes class 0, the right class 1; bilinear
        # upsampling to 4x4 predicts class 0 in columns 0-1 and class 1 in columns 2-3.
        logits = torch.zeros(len(x), 2, 2, 2)
        logits[:, 0, :, 0] = logits[:, 1, :, 1] = 1.0
        logits[:, 1, :, 0] = logits[:, 0, :, 1] = -1.0
        return {"out": logits} if as_dict else logits

    masks = torch.tensor([[[0, 0, 1, 1]] * 4,                       # all right
                          [[0, 0, 0, 0]] * 3 + [[IGN] * 4]])        # columns 2-3 wrong, last row ignored
    batches = [Batch(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), masks),
               Batch.empty((4, 4, 3), target=torch.zeros(0, 4, 4, dtype=torch.long))]  # padding
    prepare = DeviceAugment(DataConfig(), torch.device("cpu"), train=False)
    s = evaluate_segmentation(forward, batches, prepare, torch.float32, num_classes=2, ignore_index=IGN)
    assert calls == [(2, 3, 4, 4), (0, 3, 4, 4)]  # the empty batch still runs forward
    # Confusion [[8 + 6, 6], [0, 8]].
    assert s["pixels"] == 28 and s["aAcc"] == pytest.approx(22 / 28)
    assert s["IoU"] == pytest.approx([14 / 20, 8 / 14]) and s["mIoU"] == pytest.approx((14 / 20 + 8 / 14) / 2)
