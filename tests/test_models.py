"""ConvNeXt: paper parameter counts, key/shape/output parity with timm, weight import, FLOPs."""

from __future__ import annotations

import copy
import functools
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from pretrain.models import create_model, list_models
from pretrain.models.flops import flops_per_image
from pretrain.models.weights import load_weights

pytestmark = pytest.mark.unit


def meta_models(name: str, **kwargs):
    """(ours, timm's) on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return create_model(name, **kwargs), timm.create_model(name, pretrained=False, **kwargs)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def randomized(name: str, num_classes: int = 1000):
    """A model whose layer scales, norms and biases are far from their trivial init values."""
    return copy.deepcopy(_randomized(name, num_classes))


@functools.cache
def _randomized(name: str, num_classes: int):
    torch.manual_seed(0)
    model = create_model(name, layer_scale_init=0.5, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def to_official(state_dict: dict) -> dict:
    """Our (timm) layout -> facebookresearch layout, written independently of weights.py."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("stem."):
            key = "downsample_layers.0." + key[len("stem."):]
        elif m := re.match(r"stages\.(\d+)\.downsample\.(.*)", key):
            key = f"downsample_layers.{m[1]}.{m[2]}"
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key):
            rest = m[3].replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
            key = f"stages.{m[1]}.{m[2]}.{rest}"
            if "pwconv" in rest and rest.endswith("weight"):
                value = value.flatten(1)  # official pwconv are Linear: [out, in]
        elif key.startswith("head.norm."):
            key = key[len("head."):]
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        out[key] = value.clone()
    return out


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("name,millions", [("convnext_tiny", 28.59), ("convnext_small", 50.22),
                                           ("convnext_base", 88.59), ("convnext_large", 197.77),
                                           ("convnext_xlarge", 350.20)])
def test_parameter_counts_match_paper_and_timm(name, millions):
    ours, theirs = meta_models(name)
    assert round(n_params(ours) / 1e6, 2) == millions
    assert n_params(ours) == n_params(theirs)


def test_xlarge_22k_parameter_count():
    ours, theirs = meta_models("convnext_xlarge", num_classes=21841)
    assert round(n_params(ours) / 1e6, 2) == 392.90
    assert n_params(ours) == n_params(theirs)


@pytest.mark.parametrize("name", list_models())
def test_state_dict_keys_and_shapes_match_timm(name):
    ours, theirs = meta_models(name)
    assert shapes(ours) == shapes(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same order too
    assert not list(ours.buffers())


def test_xlarge_22k_keys_and_options_match_timm():
    ours, theirs = meta_models("convnext_xlarge", num_classes=21841)
    assert shapes(ours) == shapes(theirs)
    assert not any(k.startswith("stages.0.downsample") for k in ours.state_dict())
    # No layer scale and no classifier are expressed the same way as in timm.
    with torch.device("meta"):
        no_ls = create_model("convnext_tiny", layer_scale_init=0, num_classes=0)
        # timm.create_model drops None kwargs, so build timm's class directly.
        timm_no_ls = timm.models.convnext.ConvNeXt(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                                                   ls_init_value=None, num_classes=0)
    assert shapes(no_ls) == shapes(timm_no_ls)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="convnext_xlarge"):
        create_model("convnext_huge")


# ------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("name,size", [("convnext_atto", 64), ("convnext_tiny", 32)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_match_timm(name, size, channels_last):
    ours = randomized(name).eval()
    with torch.device("meta"):  # skip timm's weight init; assign=True materialises our tensors
        theirs = timm.create_model(name, pretrained=False).eval()
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()), strict=True, assign=True)
    x = torch.randn(2, 3, size, size)
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
        theirs = theirs.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits, ref = ours(x), theirs(x)
        features = ours.forward_features(x)
        ref_features = theirs.forward_head(theirs.forward_features(x), pre_logits=True)
    assert ref.abs().max() > 0.1  # the comparison is not trivially between near-zero outputs
    assert (logits - ref).abs().max().item() <= 1e-5
    assert (features - ref_features).abs().max().item() <= 1e-5
    assert torch.equal(ours.forward_head(features), logits)


def test_drop_path_only_in_training():
    model = create_model("convnext_atto", drop_path_rate=0.5, layer_scale_init=1.0, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))
    blocks = [b for s in model.stages for b in s.blocks]
    rates = [b.drop_path.drop_prob for b in blocks if hasattr(b.drop_path, "drop_prob")]
    assert rates == pytest.approx(torch.linspace(0, 0.5, 12)[1:].tolist())  # block 0 has rate 0: Identity


def test_activation_checkpointing_gives_same_gradients():
    def loss_and_grads(checkpoint_stages):
        torch.manual_seed(0)
        model = create_model("convnext_atto", num_classes=10, drop_path_rate=0.2, layer_scale_init=0.5,
                             checkpoint_stages=checkpoint_stages).train()
        x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        loss = model(x).logsumexp(1).mean()
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in model.named_parameters()}

    loss, grads = loss_and_grads(())
    for stages in [(0, 2), (0, 1, 2, 3)]:
        loss_ckpt, grads_ckpt = loss_and_grads(stages)
        assert (loss - loss_ckpt).abs().item() <= 1e-6
        assert max((grads[k] - grads_ckpt[k]).abs().max().item() for k in grads) <= 1e-6
    model = create_model("convnext_atto", num_classes=10)
    model.set_grad_checkpointing()
    assert all(s.grad_checkpointing for s in model.stages)


def test_forward_stages_strides_and_channels():
    model = create_model("convnext_atto", num_classes=0).eval()
    with torch.no_grad():
        maps = model.forward_stages(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 40, 16, 24), (1, 80, 8, 12), (1, 160, 4, 6), (1, 320, 2, 3)]
    assert model.num_features == 320


def test_reset_classifier():
    model = create_model("convnext_atto", num_classes=1000)
    model.reset_classifier(21841)
    assert tuple(model.head.fc.weight.shape) == (21841, 320) and model.num_classes == 21841
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 320)


@pytest.mark.parametrize("name,gmacs", [("convnext_tiny", 4.47), ("convnext_xlarge", 60.98)])
def test_flops_match_timm(name, gmacs):
    model, _ = meta_models(name)
    assert flops_per_image(model, 224) / 2e9 == pytest.approx(gmacs, rel=0.02)


# ------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny"])
def test_official_checkpoint_round_trip(name, tmp_path):
    source = randomized(name, num_classes=10)
    path = tmp_path / "official.pth"
    torch.save({"model": to_official(source.state_dict())}, path)
    target = create_model(name, num_classes=10)
    load_weights(target, str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_safetensors_and_wrapped_checkpoints(tmp_path):
    source = randomized("convnext_atto", num_classes=10)
    sd = source.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    target = create_model("convnext_atto", num_classes=10)
    load_weights(target, f"file://{tmp_path / 'w.safetensors'}")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in sd.items())

    # DDP / torch.compile prefixes and training-checkpoint wrappers; EMA only when asked.
    ema = {f"module.{k}": v + 1 for k, v in sd.items()}
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "model_ema": ema}, tmp_path / "ck.pth")
    load_weights(target, tmp_path / "ck.pth")
    assert torch.equal(target.head.fc.bias, sd["head.fc.bias"])
    load_weights(target, tmp_path / "ck.pth", use_ema=True)
    assert torch.equal(target.head.fc.bias, sd["head.fc.bias"] + 1)


def test_wrong_file_gives_clear_error(tmp_path):
    torch.save({"model": {"encoder.layer.0.weight": torch.zeros(2)}}, tmp_path / "bad.pth")
    expected = r"(?i)expected timm-layout keys.*stem\.0\.weight.*downsample_layers"
    with pytest.raises(ValueError, match=expected):
        load_weights(create_model("convnext_atto"), tmp_path / "bad.pth")


def _timm_twin(name, ours, **kwargs):
    with torch.device("meta"):
        theirs = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()), strict=True, assign=True)
    return theirs


def _train_step(model, x, seed, amp=False):
    """Loss and gradients of one training forward/backward (drop path active) under `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.float() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny"])
def test_training_step_with_drop_path_matches_timm(name):
    """Layer scale, stochastic depth and the residual are fused into one addcmul: same math as timm."""
    torch.manual_seed(0)
    ours = create_model(name, num_classes=10, drop_path_rate=0.3, layer_scale_init=0.5).train()
    theirs = _timm_twin(name, ours, drop_path_rate=0.3).train()
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss, grads = _train_step(ours, x, seed=3)
    ref_loss, ref_grads = _train_step(theirs, x, seed=3)
    assert _train_step(ours, x, seed=4)[0] != loss  # a different seed drops other paths
    assert (loss - ref_loss).abs().item() <= 1e-5
    assert max((grads[k] - ref_grads[k]).abs().max().item() for k in grads) <= 1e-5


def test_bf16_matches_timm_and_runs_through_fp32_kernels_without_native_bf16():
    from pretrain.engine import cpu_bf16

    torch.manual_seed(0)
    ours = randomized("convnext_atto", num_classes=10).train()
    cpu_bf16.apply(ours)  # what the trainer does on a CPU without bf16 instructions
    theirs = _timm_twin("convnext_atto", ours).train()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss, grads = _train_step(ours, x, seed=0, amp=True)
    ref_loss, ref_grads = _train_step(theirs, x, seed=0, amp=True)
    assert (loss - ref_loss).abs().item() <= 2e-2 * ref_loss.abs().item()
    for k in grads:  # bf16 rounding, not different math
        assert (grads[k] - ref_grads[k]).norm() <= 5e-2 * ref_grads[k].norm() + 1e-6, k
    # bf16 weights (DeepSpeed's bf16 mode): bf16 activations out, close to fp32
    model = copy.deepcopy(ours).eval()
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 5e-2 * ref.abs().max()
    # the emulated GEMM is a bf16 GEMM: bf16-rounded inputs, fp32 accumulation, bf16 output
    a, w = torch.randn(64, 96), torch.randn(384, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cpu_bf16.linear(a, w, None)
    assert y.dtype == torch.bfloat16
    exact = (a.bfloat16().double() @ w.bfloat16().double().T)
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    if not cpu_bf16._native_cpu_bf16():
        assert torch.equal(y, (a.bfloat16().float() @ w.bfloat16().float().T).bfloat16())


def test_the_model_has_only_stock_layers_and_the_cpu_emulation_is_applied_from_outside():
    """On CUDA (or the meta device) the model is plain nn.Conv2d / F.linear; the engine swaps in the CPU
    bf16 emulation only where it is needed, keeping every option (padding mode, dilation) and key."""
    from pretrain.engine import cpu_bf16
    from pretrain.models.convnext import PointwiseLinear

    with torch.device("meta"):
        model = create_model("convnext_atto", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, PointwiseLinear)]
    assert convs and all(type(m) is torch.nn.Conv2d for m in convs)
    # torch's own kernel (not `is F.linear`: DeepSpeed's ZeRO-3 rebinds torch.nn.functional.linear in-process)
    assert PointwiseLinear.linear is torch._C._nn.linear
    assert linears and all("linear" not in vars(m) for m in linears)
    assert not cpu_bf16.needed("bf16", torch.device("cuda")) and not cpu_bf16.needed("fp32", torch.device("cpu"))
    cpu = create_model("convnext_atto", num_classes=10)
    keys = list(cpu.state_dict())
    assert cpu_bf16.apply(cpu) == len(convs) + len(linears) and list(cpu.state_dict()) == keys
    conv = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="reflect").bfloat16()
    reference = conv(torch.randn(1, 4, 9, 9).bfloat16())
    x = torch.randn(1, 4, 9, 9).bfloat16()
    expected = conv(x)
    cpu_bf16.apply(conv)
    assert torch.allclose(conv(x).float(), expected.float(), rtol=2e-2, atol=2e-2) and reference.shape == (1, 4, 9, 9)
