"""Fine-tuning the paper's way: layer-wise LR decay numbered as the official code, ``model.init_from`` from
every source kind, the 22k -> 1k head, bitwise resume of a fine-tuning run and a fine-tuned model beating
one trained from scratch (2 gloo processes under torchrun, shards and runs on the moto S3 server)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from pretrain.config import ConfigError, ModelConfig, OptimConfig, grad_accum_steps, load_config
from pretrain.data.shards import load_synsets
from pretrain.evaluate import in1k_subset
from pretrain.export import export
from pretrain.init_from import initialize, locate
from pretrain.models import create_model
from pretrain.models.weights import official_to_timm
from pretrain.optim import StepPlan, build_optimizer, param_groups, step_plan
from pretrain.preflight import check_run
from tests.conftest import shard_synthetic_set
from tests.test_training import assert_same, copy_checkpoint, full_state, rank_tensors
from tests.workers import ROOT, SMOKE, run_workers

pytestmark = pytest.mark.integration

# ----------------------------------------------------------------------------------------- the official rule
# Transcribed from facebookresearch/ConvNeXt optim_factory.py (get_num_layer_for_convnext), on official names.


def official_layer_id(var_name: str) -> int:
    num_max_layer = 12
    if var_name.startswith("downsample_layers"):
        stage_id = int(var_name.split(".")[1])
        if stage_id == 0:
            return 0
        if stage_id in (1, 2):
            return stage_id + 1
        return 12
    if var_name.startswith("stages"):
        stage_id, block_id = int(var_name.split(".")[1]), int(var_name.split(".")[2])
        if stage_id in (0, 1):
            return stage_id + 1
        if stage_id == 2:
            return 3 + block_id // 3
        return 12
    return num_max_layer + 1


def official_name(ours: str) -> str:
    """Our (timm) parameter name as the official code names it, written out here, independently of
    pretrain.models.weights (whose official -> timm renaming is checked against it below)."""
    for pattern, repl in ((r"^stem\.", "downsample_layers.0."),
                          (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
                          (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."), (r"\.conv_dw\.", ".dwconv."),
                          (r"\.mlp\.fc([12])\.", r".pwconv\1."), (r"^head\.fc\.", "head."),
                          (r"^head\.norm\.", "norm.")):
        ours = re.sub(pattern, repl, ours)
    return ours


def test_layer_decay_of_every_xlarge_parameter_is_the_official_numbering():
    with torch.device("meta"):
        model = create_model("convnext_xlarge", num_classes=1000)
    names = [n for n, _ in model.named_parameters()]
    official = {n: official_name(n) for n in names}
    assert official_to_timm(dict.fromkeys(official.values())) == dict.fromkeys(names)  # the inverse is right
    assert {official["stem.0.weight"], official["stages.2.blocks.26.mlp.fc2.bias"], official["head.norm.weight"]} == {
        "downsample_layers.0.0.weight", "stages.2.26.pwconv2.bias", "norm.weight"}
    groups = param_groups(model, weight_decay=1e-8, layer_decay=0.8)
    group_of = {id(p): g for g in groups for p in g["params"]}
    assert len(group_of) == len(names) == 344 and len(groups) == 28  # 14 layers x (decay, no decay)
    for name, param in model.named_parameters():
        group = group_of[id(param)]
        assert group["lr_scale"] == pytest.approx(0.8 ** (13 - official_layer_id(official[name])), rel=1e-12), name
        no_decay = param.ndim == 1 or name.endswith(".bias")  # official get_parameter_groups (no skip list)
        assert group["weight_decay"] == (0.0 if no_decay else 1e-8), name
    scale = {n: group_of[id(p)]["lr_scale"] for n, p in model.named_parameters()}
    assert scale["stem.0.weight"] == pytest.approx(0.8 ** 13) and scale["head.fc.weight"] == 1.0
    assert scale["stages.3.downsample.1.weight"] == scale["stages.3.blocks.2.gamma"] == pytest.approx(0.8)
    # Off (1.0): pretraining's two groups, decay first.
    plain = param_groups(model, 0.05)
    assert [(g["weight_decay"], g["lr_scale"], len(g["params"])) for g in plain] == [(0.05, 1.0, 113), (0.0, 1.0, 231)]


def test_each_step_uses_the_scheduled_lr_times_the_group_scale():
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=4)
    optimizer = build_optimizer(model, OptimConfig(lr=1.0, weight_decay=0.0, layer_decay=0.5), on_cuda=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for group in optimizer.param_groups:  # what the trainer does every step (pretrain.engine.deepspeed.set_lr)
        group["lr"] = 1e-3
    optimizer.step()
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups)  # reads back as the schedule's value
    # Adam's first step moves every element by lr (m / sqrt(v) = 1); atto: stage 3 = layer 5, head 6.
    for name, expected in (("stem.0.bias", 0.5 ** 6), ("stages.2.blocks.5.norm.weight", 0.5 ** 2),
                           ("stages.3.blocks.0.gamma", 0.5), ("head.fc.bias", 1.0)):
        step = before[name] - dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(step, torch.full_like(step, 1e-3 * expected), rtol=1e-3, atol=0), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_steps_each_group_with_its_scaled_lr(stage, monkeypatch):
    """Through DeepSpeed's ZeRO wrappers (1 gloo rank): bitwise the step of AdamW given lr x lr_scale per group."""

    import torch.distributed as dist

    from pretrain.config import PrecisionConfig, ZeroConfig
    from pretrain.engine import deepspeed as ds
    from pretrain.engine.distributed import free_port

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model, reference = create_model("convnext_atto", num_classes=4), create_model("convnext_atto", num_classes=4)
        reference.load_state_dict(model.state_dict())
        optimizer = build_optimizer(model, OptimConfig(lr=1.0, weight_decay=0.05, layer_decay=0.5), on_cuda=False)
        ds_config = ds.deepspeed_config(PrecisionConfig(dtype="fp32"), ZeroConfig(stage=stage), 0.0, 2, 1, 1, 10**6)
        engine = ds.initialize(model, optimizer, ds_config, 60)
        manual = torch.optim.AdamW([{**g, "lr": 1e-3 * g["lr_scale"]} for g in param_groups(reference, 0.05, 0.5)],
                                   foreach=True)
        x = torch.randn(2, 3, 32, 32)
        ds.set_lr(engine, 1e-3)
        engine.backward(engine(x).square().mean())
        engine.step()
        reference(x).square().mean().backward()
        manual.step()
        assert [g["lr"] for g in engine.optimizer.param_groups] == [1e-3] * len(manual.param_groups)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            assert_same({n: p.detach().clone() for n, p in engine.module.named_parameters()},
                        {n: p.detach() for n, p in reference.named_parameters()})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,drop_path,workers,micro,ema", [
    ("base", 0.2, 32, 16, False), ("large", 0.3, 32, 16, False), ("xlarge", 0.4, 64, 8, True)])
def test_finetune_recipes_are_the_official_commands(name, drop_path, workers, micro, ema):
    """facebookresearch/ConvNeXt TRAINING.md, "Fine-tune from ImageNet-22K pre-training", the 384x384 commands."""
    cfg = load_config(ROOT / "configs" / f"convnext_{name}_in22k_ft_in1k_384.toml")
    m = cfg.model
    assert (m.name, m.num_classes, m.drop_path_rate, m.head_init_scale) == (f"convnext_{name}", 1000, drop_path, 0.001)
    pretraining = load_config(ROOT / "configs" / f"convnext_{name}_in22k.toml")
    assert (m.init_from, m.init_from_ema, m.head_from) == (pretraining.run.url, False, "fresh")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.optim.min_lr) == (5e-5, 1e-8, 0.8, 1e-6)
    assert (cfg.data.image_size, cfg.data.mixup, cfg.data.cutmix, cfg.data.label_smoothing, cfg.data.random_erasing,
            cfg.data.randaugment) == (384, 0.0, 0.0, 0.1, 0.25, "rand-m9-mstd0.5-inc1")
    assert (cfg.ema.enabled, cfg.ema.decay) == (ema, 0.9999)
    assert (cfg.launch.num_workers, cfg.data.micro_batch_size) == (workers, micro)
    assert grad_accum_steps(cfg.schedule, cfg.data, cfg.launch.num_workers) == 1  # 512 per step
    assert step_plan(cfg.schedule, 1_281_167) == StepPlan(2502, 75_060, 0)  # 30 epochs, no warmup


# ----------------------------------------------------------------------------------------- runs and sources

PRETRAIN = ["data.mixup=0.0", "data.num_workers=0", "data.eval_url=", "schedule.steps=160", "schedule.warmup_steps=3",
            "optim.lr=6e-3", "data.micro_batch_size=16", "schedule.global_batch_size=32", "checkpoint.every_steps=80",
            "logging.every_steps=40"]


@pytest.fixture(scope="module")
def bucket(make_bucket):
    return make_bucket("finetune")


@pytest.fixture(scope="module")
def pretrained(synth_shards, bucket):
    """A pretraining run on the 10-class set (32 px), checkpoints at steps 80 and 160, EMA on."""
    url = f"{bucket}/pretrain"
    run = run_workers(2, [f"data.train_url={synth_shards['train']}", f"run.url={url}", *PRETRAIN])
    assert run.returncode == 0, run.output[-3000:]
    return url


@pytest.fixture(scope="module")
def second_set(bucket, tmp_path_factory):
    """The pretraining's 10 classes drawn anew (another seed) at 40 px; with a fresh head, what carries over
    from pretraining is the features."""
    return shard_synthetic_set(tmp_path_factory.mktemp("second"), f"{bucket}/second", size=40, seed=1,
                               holdout=30, shard_samples=100)


def atto(num_classes=10, **model_kwargs) -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig(name="convnext_atto", num_classes=num_classes, **model_kwargs)
    torch.manual_seed(1)
    return create_model(cfg.name, num_classes=num_classes, head_init_scale=cfg.head_init_scale), cfg


CLASSES_10 = [f"class_{i:03d}" for i in range(10)]


@pytest.mark.parametrize("ema", [True, False])
def test_init_from_a_run_url_loads_its_newest_checkpoint(pretrained, ema):
    model, cfg = atto(init_from=pretrained, init_from_ema=ema)
    source = locate(cfg)
    assert (source.step, source.classes) == (160, tuple(CLASSES_10))
    initialize(model, cfg, CLASSES_10, source=source)
    assert_same(dict(model.state_dict()), full_state(pretrained, 160, "ema" if ema else "master"))


def test_init_from_files_of_every_layout(pretrained, tmp_path):
    import timm

    reference = full_state(pretrained, 160, "ema")
    exported = tmp_path / "export.safetensors"
    export(pretrained, str(exported), ema=True)
    timm_model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    timm_state = {k: torch.randn_like(v) for k, v in timm_model.state_dict().items()}  # timm's own key layout
    torch.save(timm_state, tmp_path / "timm.pth")
    official = {official_name(k): v.flatten(1) if v.ndim == 4 and v.shape[-1] == 1 else v  # Linear MLP weights
                for k, v in timm_state.items()}
    torch.save({"model": official}, tmp_path / "official.pth")  # the official release layout
    for path, expected in ((exported, reference), (tmp_path / "timm.pth", timm_state),
                           (tmp_path / "official.pth", timm_state)):
        model, cfg = atto(init_from=str(path))
        initialize(model, cfg, CLASSES_10)
        assert_same(dict(model.state_dict()), expected)
    # Another head (10 -> 3 classes: fresh, x head_init_scale) and another resolution (no position embeddings).
    model, cfg = atto(num_classes=3, init_from=str(exported), head_init_scale=1e-3)
    fresh = model.head.fc.weight.detach().clone()
    initialize(model, cfg, ["a", "b", "c"])
    assert torch.equal(model.head.fc.weight, fresh) and fresh.abs().max() < 1e-4
    assert torch.equal(model.stem[0].weight, reference["stem.0.weight"])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_head_rows_follow_class_names_from_a_22k_head_to_the_1k_synsets(tmp_path):
    synsets_22k, synsets_1k = load_synsets("imagenet22k_synsets"), load_synsets("imagenet_synsets")
    body, _ = atto()
    state = {k: v for k, v in body.state_dict().items() if not k.startswith("head.fc.")}
    state["head.fc.weight"] = torch.arange(21841, dtype=torch.float32)[:, None].repeat(1, 320)  # row i holds i
    state["head.fc.bias"] = torch.arange(21841, dtype=torch.float32)
    save_file(state, str(tmp_path / "in22k.safetensors"))
    model, cfg = atto(num_classes=1000, init_from=str(tmp_path / "in22k.safetensors"), head_from="match_classes",
                      head_init_scale=1e-3)
    initialize(model, cfg, synsets_1k)
    weight, bias = model.head.fc.weight.detach(), model.head.fc.bias.detach()
    position = {s: i for i, s in enumerate(synsets_22k)}
    for j, synset in enumerate(synsets_1k):
        if synset == "n04399382":  # teddy bear: not among timm's 22k synsets, a fresh row
            assert bias[j] == 0 and 0 < weight[j].abs().max() < 1e-4
        else:
            assert torch.all(weight[j] == position[synset]) and bias[j] == position[synset], synset
    present = [j for j, s in enumerate(synsets_1k) if s != "n04399382"]
    assert bias[present].long().tolist() == in1k_subset(synsets_22k).tolist()  # the eval's 1k subset, same rows
    assert_same({k: v for k, v in model.state_dict().items() if not k.startswith("head.fc.")},
                {k: v for k, v in state.items() if not k.startswith("head.fc.")})


def test_head_rows_from_a_run_follow_its_class_names(pretrained):
    model, cfg = atto(num_classes=12, init_from=pretrained, head_from="match_classes")
    classes = [f"class_{i:03d}" for i in (9, 3, 42)] + [f"new_{i}" for i in range(9)]
    initialize(model, cfg, classes)
    source = full_state(pretrained, 160, "ema")
    assert torch.equal(model.head.fc.weight[:2], source["head.fc.weight"][[9, 3]])
    assert torch.equal(model.head.fc.bias[:2], source["head.fc.bias"][[9, 3]])


def test_what_cannot_be_loaded_is_named(pretrained, tmp_path, synth_shards):
    femto = create_model("convnext_femto", num_classes=10)
    save_file(dict(femto.state_dict()), str(tmp_path / "femto.safetensors"))
    no_gamma = create_model("convnext_atto", num_classes=10, layer_scale_init=0)
    save_file(dict(no_gamma.state_dict()), str(tmp_path / "no_gamma.safetensors"))
    cases = [(dict(init_from=str(tmp_path / "femto.safetensors")),
              "model.init_from: stem.0.weight is [48, 3, 4, 4] in"),
             (dict(init_from=str(tmp_path / "no_gamma.safetensors")),
              "layer scale (gamma) is in only one of them: set model.layer_scale_init = 0"),
             (dict(init_from=pretrained, num_classes=20, head_from="keep"),
              "head.fc.weight is [10, 320] in"),
             (dict(init_from=str(tmp_path / "nope.pth")), f"model.init_from: {tmp_path / 'nope.pth'} does not exist"),
             (dict(init_from=f"{pretrained}-nope"), "does not exist")]
    for kwargs, needle in cases:
        model, cfg = atto(**kwargs)
        with pytest.raises(ConfigError, match=re.escape(needle)):
            initialize(model, cfg, CLASSES_10 + [f"x{i}" for i in range(cfg.num_classes - 10)])
    with pytest.raises(ConfigError, match="model.head_from: 'fresh' needs model.init_from"):
        ModelConfig(head_from="fresh")
    # Before Ray starts: the driver's checks read the run's manifest / the safetensors header, not the weights.
    base = load_config(SMOKE, [f"data.train_url={synth_shards['train']}", "run.url=runs/x"])
    for init, needle in ((f"{tmp_path}/missing.safetensors", "does not exist"),
                         (str(tmp_path / "femto.safetensors"), "is [48, 3, 4, 4] in")):
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, init_from=init))
        with pytest.raises(ConfigError, match=re.escape(needle)):
            check_run(cfg, on_cuda=False)
    cli = subprocess.run([sys.executable, "-m", "launch.cli", "train", "--config", str(SMOKE), "--set",
                          f"data.train_url={synth_shards['train']}", "--set", f"run.url={tmp_path}/run", "--set",
                          f"model.init_from={pretrained}/nope"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=120)
    assert cli.returncode == 2 and f"model.init_from: {pretrained}/nope does not exist" in cli.stdout, cli.stdout
    assert "Ray" not in cli.stdout


# ----------------------------------------------------------------------------------------- fine-tuning runs

FINETUNE = ["data.mixup=0.0", "data.num_workers=0", "data.image_size=40", "eval.max_samples=0", "optim.lr=4e-3",
            "optim.weight_decay=1e-8", "schedule.steps=32", "schedule.warmup_steps=0", "checkpoint.every_steps=16",
            "data.micro_batch_size=16", "schedule.global_batch_size=32", "logging.every_steps=8"]
TUNED = ["model.init_from_ema=false", "model.head_from=fresh", "model.head_init_scale=0.001", "optim.layer_decay=0.8"]


def finetune_overrides(second_set, run_url, *extra):
    return [f"data.train_url={second_set['train']}", f"data.eval_url={second_set['holdout']}", f"run.url={run_url}",
            *FINETUNE, *extra]


@pytest.fixture(scope="module")
def finetuned(pretrained, second_set, bucket):
    """The paper's fine-tuning, scaled down: from the pretraining run's model weights, a fresh head x 0.001,
    layer decay 0.8, at 40 px (pretrained at 32), on new images."""
    url = f"{bucket}/finetuned"
    run = run_workers(2, finetune_overrides(second_set, url, f"model.init_from={pretrained}", *TUNED))
    assert run.returncode == 0, run.output[-3000:]
    return url, run


def test_a_finetuning_run_resumes_bitwise(finetuned, pretrained, second_set, bucket):
    url, run = finetuned
    assert f"model.init_from: model weights of {pretrained}/checkpoints/step_160; head: fresh" in run.output
    resumed = f"{bucket}/finetune-resumed"
    copy_checkpoint(url, resumed, 16)  # as if the run had died after committing step 16
    again = run_workers(2, finetune_overrides(second_set, resumed, f"model.init_from={pretrained}", *TUNED))
    assert again.returncode == 0 and "resuming at step 16" in again.output, again.output[-3000:]
    assert "model.init_from:" not in again.output  # a resumed run takes its weights from its own checkpoint
    for kind in ("master", "ema"):
        assert_same(full_state(url, 32, kind), full_state(resumed, 32, kind))
    for rank in (0, 1):  # Adam moments too
        assert_same(rank_tensors(url, 32, rank), rank_tensors(resumed, 32, rank))


def test_a_finetuned_model_beats_the_same_model_trained_from_scratch(finetuned, second_set, bucket):
    _, run = finetuned
    scratch = run_workers(2, finetune_overrides(second_set, f"{bucket}/scratch", *TUNED[2:]))  # same recipe
    assert scratch.returncode == 0, scratch.output[-3000:]
    tuned, fresh = run.summary["eval"], scratch.summary["eval"]
    assert tuned["model_samples"] == fresh["model_samples"] == 300
    assert tuned["model_top1"] > fresh["model_top1"] + 0.1, (tuned, fresh)  # chance: 10%
