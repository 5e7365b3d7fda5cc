"""finetune-many's actors keep the base between subjects (pipeline/train/bases.py): the kept base
comes back exactly as loaded, and a subject trained in a reused actor is bit-identical to the
same subject trained by a fresh one."""

import csv

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.model import BlipDiffusion
from pipeline.model.subject import add_lora
from pipeline.train import bases
from pipeline.train.many import finetune_many
from tests.tinydata import publish_dataset

TRAIN = ["profile=tiny", "train.resolution=32", "train.cpus_per_worker=1", "tracking.enabled=false", "finetune.lora_rank=2",
         "finetune.steps=3", "finetune.concurrency=1", "finetune.validation_steps=1"]


def test_a_kept_base_comes_back_exactly_as_loaded(monkeypatch):
    monkeypatch.setattr(bases, "_kept", {})
    path = load_config(overrides=["profile=tiny"]).model_path("blip_diffusion")
    torch.manual_seed(7)
    model = bases.load_base(path)
    after_load = torch.rand(4)
    # What a subject does to it: LoRA wrappers, trained weights, flags, gradients, attributes.
    add_lora(model.unet, 2, None)
    with torch.no_grad():
        next(model.text_encoder.parameters()).add_(1.0)
        model.unet.conv_in.weight.mul_(3.0)
    model.qformer.requires_grad_(False)
    model.unet.conv_in.weight.grad = torch.ones_like(model.unet.conv_in.weight)
    model.unet.extra = "left by a subject"
    model.train()

    loads = bases.loads
    torch.manual_seed(7)
    kept = bases.load_base(path)
    assert torch.equal(torch.rand(4), after_load)  # a kept base and a load leave the same RNG
    assert kept is model and bases.loads == loads
    fresh = BlipDiffusion.from_pretrained(path)
    assert [(n, type(m)) for n, m in kept.named_modules()] == [(n, type(m)) for n, m in fresh.named_modules()]
    ours, theirs = kept.state_dict(), fresh.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    flags = [(n, p.requires_grad) for n, p in fresh.named_parameters()]
    assert [(n, p.requires_grad) for n, p in kept.named_parameters()] == flags and any(f for _, f in flags)
    assert all(p.grad is None for p in kept.parameters())
    assert not kept.training and not hasattr(kept.unet, "extra")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "blipd"])
def test_a_subject_in_a_reused_actor_equals_it_in_a_fresh_one(ray_local, tmp_path, method):
    data = tmp_path / "ds"
    publish_dataset(data, {"a": "dog", "b": "cat"}, per_subject=2, size=(40, 32))

    def run(name, subjects):
        out = tmp_path / name
        config = load_config(overrides=[*TRAIN, f"finetune.method={method}", f"finetune.subject={data}", f"finetune.out={out}",
                                        f"finetune.subjects={subjects}", f"train.storage_path={tmp_path / name / 'runs'}"])
        rows = {r.subject_id: r for r in finetune_many(config)}
        assert {r.status for r in rows.values()} == {"ok"}
        with (out / "finetune-many.csv").open() as fh:
            assert {r["subject_id"]: int(r["base_loads"]) for r in csv.DictReader(fh)} == {s: r.base_loads for s, r in rows.items()}
        folder = out / f"b-{method}"
        return {name: load_file(p) for name, p in ((p.name, p) for p in folder.glob("*.safetensors"))}, rows

    reused, rows = run("both", '["a","b"]')
    assert rows["a"].base_loads == 1 and rows["b"].base_loads == 0  # b ran on the base a left behind
    fresh, rows = run("alone", '["b"]')
    assert rows["b"].base_loads == 1
    assert reused.keys() == fresh.keys() and reused
    for file in reused:
        assert reused[file].keys() == fresh[file].keys()
        for key in reused[file]:
            assert torch.equal(reused[file][key], fresh[file][key]), f"{file}/{key}"
