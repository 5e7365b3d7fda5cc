"""Fine-tuning methods: each trains a few steps in memory on the tiny model, changes only what
it should, and its saved subject reloads on a fresh base as the same model."""

import pytest
import torch

from pipeline.config import load_config
from pipeline.model import BlipDiffusion
from pipeline.model.subject import SubjectModel, SubjectSpec
from pipeline.train.losses import add_noise, diffusion_target
from pipeline.train.methods import PRIOR_CAPTION, REFERENCES_FOLDER, get_method, prior_preserving_loss
from tests.imagefiles import photo


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("subject")
    (root / REFERENCES_FOLDER).mkdir()
    for i in range(3):
        photo(i, (64, 64)).save(root / REFERENCES_FOLDER / f"{i}.png")
    return root


def _config(subject_dir, method, *extra):
    return load_config(overrides=[
        "profile=tiny", f"train.data={subject_dir}", f"train.method={method}", "train.resolution=64",
        f"finetune.method={method}", "finetune.subject_id=dog", "finetune.category=dog", "finetune.lora_rank=2", *extra,
    ])


def _train(method, steps=2, captions=("", "", "")):
    torch.manual_seed(0)
    params = method.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    alphas = method.model.scheduler.alphas_cumprod
    latents = torch.randn(3, 4, 8, 8)
    for _ in range(steps):
        prompts = method.build_prompts(["dog"] * 3, list(captions))
        noise, t = torch.randn_like(latents), torch.randint(0, 1000, (3,))
        prediction = method(torch.zeros(3, 3, 224, 224), ["dog"] * 3, prompts, add_noise(latents, noise, t, alphas), t, torch.zeros(3, dtype=torch.bool))
        method.loss(prediction, diffusion_target(latents, noise, t, alphas, "epsilon")).backward()
        optimizer.step()
        optimizer.zero_grad()
    return params


def _changed(method, base):
    """Top-level parts of the model whose base weights differ from `base` (LoRA adapters excluded)."""
    out = set()
    for name, param in method.model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        if not torch.equal(param, base.get_parameter(key)):
            out.add(name.split(".")[0])
    return out


@pytest.fixture(scope="module")
def base():
    return BlipDiffusion.from_pretrained(load_config(overrides=["profile=tiny"]).model_path("blip_diffusion"))


@pytest.mark.parametrize(
    ("name", "parts", "files"),
    [
        ("blipd", {"unet"}, {"subject.json", "subject_embeds.safetensors", "unet.safetensors"}),
        ("lora", set(), {"subject.json", "subject_embeds.safetensors", "lora.safetensors"}),
        ("textual-inversion", set(), {"subject.json", "subject_embeds.safetensors"}),
        ("dreambooth", {"unet"}, {"subject.json", "unet.safetensors"}),
    ],
)
def test_method_trains_only_its_parts_and_reloads_on_a_fresh_base(subject_dir, base, tmp_path, name, parts, files):
    method = get_method(name).load(_config(subject_dir, name))
    start = None if method.subject_embeds is None else method.subject_embeds.detach().clone()
    if start is not None:  # the mean Q-Former embedding of the photos; textual inversion's one word vector
        vectors = 1 if name == "textual-inversion" else base.num_query_tokens
        assert start.shape == (1, vectors, base.text_encoder.config.hidden_size)
    _train(method, captions=("", PRIOR_CAPTION, "") if name == "dreambooth" else ("", "", ""))
    assert _changed(method, base) == parts  # lora and textual-inversion: base bit-identical
    if start is not None:
        assert not torch.equal(method.subject_embeds, start)
    if name == "lora":
        lora = [p for n, p in method.model.unet.named_parameters() if "lora_B" in n]
        assert lora and any(p.abs().sum() > 0 for p in lora)

    method.eval().save(tmp_path)
    folder = tmp_path / method.MODEL_FOLDER
    assert {p.name for p in folder.iterdir()} == files
    spec = SubjectSpec.read(folder)
    assert (spec.method, spec.subject_id, spec.category, spec.resolution) == (name, "dog", "dog", 64)
    subject = SubjectModel.load(folder)
    kwargs = {"steps": 2, "guidance_scale": 2.0, "seed": 0}
    assert subject.generate("on the beach", **kwargs)[0].size == (64, 64)
    with torch.no_grad():
        reloaded = subject.generate("on the beach", **kwargs)[0]
        trained = SubjectModel(method.model, method.spec(), method.subject_embeds).generate("on the beach", **kwargs)[0]
    assert reloaded.tobytes() == trained.tobytes()


def test_dreambooth_prompts_and_prior_loss(subject_dir):
    method = get_method("dreambooth").load(_config(subject_dir, "dreambooth", "finetune.identifier=zwx"))
    assert method.build_prompts(["dog", "dog"], ["", PRIOR_CAPTION]) == ["a zwx dog", "a dog"]
    pred, target = torch.zeros(4, 1), torch.tensor([[1.0], [1.0], [2.0], [2.0]])
    prior = torch.tensor([False, False, True, True])
    assert prior_preserving_loss(pred, target, prior, 0.5).item() == pytest.approx(1.0 + 0.5 * 4.0)
    assert prior_preserving_loss(pred, target, torch.zeros(4, dtype=torch.bool), 0.5).item() == pytest.approx(2.5)
