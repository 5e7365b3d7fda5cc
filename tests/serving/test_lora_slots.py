"""LoRA slots (pipeline/serving/lora_slots.py): a slot layer adds what peft's LoraLayer adds,
row by row; a compiled UNet draws any LoRA subject and any mix of them with the graphs of its
first call at each batch size; a subject whose rank the slots cannot hold is refused alone; an
evicted subject's slot is zero. With merging, rows of one slot draw it merged into a working
weight, rows of several each their own slot merged into its row's weight, never stale."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

from pipeline.model import BlipDiffusion
from pipeline.serving.app import _api_error
from pipeline.serving.engine import Engine, Job
from pipeline.serving.lora_slots import MERGED, PRODUCTS, ROW_WEIGHTS, LoraSlots, LoraUnfit
from pipeline.serving.requests import GenerationRequest
from pipeline.serving.subjects import SubjectUnusable, ZeroShotSubject, read_subject
from tests.host_copies import HostCopies
from tests.serve_subjects import TINY

STEPS = 2
TOLERANCE = 1e-6  # float32: the same products, summed in another order


@pytest.fixture(scope="module")
def subjects(lora_folders):
    """The LoRA subjects a to d of tests/serving/conftest.py, read."""
    return {name: read_subject(folder, name, "1") for name, folder in lora_folders.items()}


def job(subject, seed, num_images=1):
    return Job(GenerationRequest("on the beach", num_images, seed, STEPS, 7.5, None, None, None), subject, 64, 64)


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


class Attention(nn.Module):
    """Two of the UNet's LoRA targets, by their names in diffusers' Attention."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(16, 12)
        self.to_out = nn.ModuleList([nn.Linear(12, 10, bias=False)])


def peft_subject(base: nn.Module, rank: int, alpha: float, seed: int) -> nn.Module:
    """`base` with one peft LoRA adapter of random (non-zero) weights, as a subject trains it."""
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_out.0"]), copy.deepcopy(base))
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2  # updates the size of the base output
    return model.eval()


def test_slot_layers_add_what_peft_lora_layers_add_row_by_row():
    from peft import get_peft_model_state_dict

    torch.manual_seed(0)
    base = Attention().eval()
    peft_models = [peft_subject(base, 2, 3.0, 1), peft_subject(base, 4, 4.0, 2), peft_subject(base, 8, 2.0, 3)]
    plain = copy.deepcopy(base)
    slots = LoraSlots(base, slots=4, rank=8)  # ranks 2 and 4 below r_max, 8 at it
    assert set(slots.layers) == {"to_q", "to_out.0"} and isinstance(base.to_q, nn.Linear)
    numbers = [slots.load(slots.fit(get_peft_model_state_dict(m), r), alpha / r)
               for m, r, alpha in zip(peft_models, (2, 4, 8), (3.0, 4.0, 2.0), strict=True)]
    x = torch.randn(6, 5, 16)  # (N, L, in)
    rows = [numbers[0], 0, numbers[1], numbers[2], numbers[0], 0]

    def attend(model, x):
        return model.to_out[0](model.to_q(x))

    with torch.no_grad(), slots.use(rows):
        got = attend(base, x)
    with torch.no_grad():
        for i, slot in enumerate(rows):
            if slot == 0:  # no subject: the base Linear's output exactly
                assert torch.equal(got[i], attend(plain, x[i: i + 1])[0])
            else:
                want = attend(peft_models[numbers.index(slot)], x[i: i + 1])[0]
                assert (got[i] - want).abs().max() <= TOLERANCE
    with torch.no_grad(), slots.use([numbers[1]]):  # one entry: every row
        assert (attend(base, x) - attend(peft_models[1], x)).abs().max() <= TOLERANCE
    with torch.no_grad():  # outside `use`, every row draws the base
        assert torch.equal(attend(base, x), attend(plain, x))


def test_a_freed_slot_is_zero_and_taken_again():
    from peft import get_peft_model_state_dict

    base = Attention()
    slots = LoraSlots(base, slots=2, rank=4)
    weights = slots.fit(get_peft_model_state_dict(peft_subject(base, 4, 4.0, 1)), 4)
    first, second = slots.load(weights, 1.0), slots.load(weights, 1.0)
    with pytest.raises(RuntimeError, match="every LoRA slot is taken"):
        slots.load(weights, 1.0)
    slots.free(first)
    for layer in slots.layers.values():
        assert not layer.slot_A[first].any() and not layer.slot_B[first].any() and layer.slot_scale[first] == 0
        assert layer.slot_B[second].any()
    assert slots.load(weights, 1.0) == first


def test_weights_the_slots_cannot_hold_are_refused():
    from peft import get_peft_model_state_dict

    base = Attention()
    slots = LoraSlots(base, slots=2, rank=4)
    state = get_peft_model_state_dict(peft_subject(base, 4, 4.0, 1))
    with pytest.raises(LoraUnfit, match=r"LoRA rank 8 is above serve.max_lora_rank \(4\)"):
        slots.fit(state, 8)
    with pytest.raises(LoraUnfit, match=r"no place for \(to_k.lora_A.weight\)"):
        slots.fit({**state, "to_k.lora_A.weight": torch.zeros(4, 16)}, 4)
    with pytest.raises(LoraUnfit, match="to_q.lora_A.weight of shape"):
        slots.fit(state, 2)


def test_a_compiled_unet_draws_every_lora_subject_and_mix_with_its_first_graphs(subjects):
    """peft's named adapters made every adapter switch, new adapter and per-row name list a
    Dynamo guard failure: the whole UNet recompiled for each (minutes with max-autotune on a
    GPU, then eager after torch._dynamo's recompile limit)."""
    from torch._dynamo.utils import counters

    a, b, c, d = (subjects[k] for k in "abcd")
    model = BlipDiffusion.from_pretrained(TINY)
    engine = Engine(model, max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    eager = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    torch._dynamo.reset()
    counters.clear()
    model.unet.compile(backend="eager")

    def graphs():
        return counters["stats"]["unique_graphs"]

    def draw(*jobs):
        drawn = engine.run(list(jobs))
        assert all(j.error is None for j in drawn)
        return [pixels(j.images) for j in drawn]

    [first] = draw(job(a, 1))
    alone = graphs()
    assert alone >= 1
    for subject in (b, c, d, a):  # a new subject, a switch, and back
        [got] = draw(job(subject, 1))
        [want] = eager.run([job(subject, 1)])
        assert np.array_equal(got, pixels(want.images))  # its own weights, not those baked into the graph
    assert graphs() == alone
    draw(job(a, 2), job(b, 2), job(c, 3, num_images=2))  # a new batch size: its first call may trace
    mixed = graphs()
    got = draw(job(d, 2), job(a, 2), job(b, 4, num_images=2))  # the same size, other subjects in other rows
    assert graphs() == mixed
    want = eager.run([job(d, 2), job(a, 2), job(b, 4, num_images=2)])
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - pixels(w.images)).max() <= 1  # float rounding of another batch at most
    assert np.array_equal(draw(job(a, 1))[0], first)  # merged again: the graphs of its first call
    assert graphs() == mixed


def test_a_lora_subject_of_too_high_a_rank_is_refused_alone(subjects):
    """A subject the slots cannot hold fails its own requests with a 422 naming
    serve.max_lora_rank; the requests batched with it are drawn."""
    a, b = subjects["a"], subjects["b"]
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8, max_lora_rank=2)
    low = copy.copy(b)
    low.spec = copy.copy(b.spec)
    low.key, low.spec.lora_rank = "low/1", 2
    low.lora = {k: v[:2] if ".lora_A." in k else v[:, :2] for k, v in b.lora.items()}  # rank 2: fits
    refused, drawn = engine.run([job(a, 1), job(low, 1)])
    assert isinstance(refused.error, SubjectUnusable) and refused.images is None
    assert "models:/a/1: LoRA rank 4 is above serve.max_lora_rank (2)" in str(refused.error)
    answer = _api_error(refused.error)
    assert (answer.status, answer.field) == (422, "subject")
    assert drawn.error is None and len(drawn.images) == 1
    assert engine.adapters == ["low/1"]


def test_an_evicted_subjects_weights_are_gone_and_its_slot_taken_again(subjects):
    a, b, c = subjects["a"], subjects["b"], subjects["c"]
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=2)
    engine.run([job(a, 1)])
    engine.run([job(b, 1)])
    engine.run([job(a, 1)])  # b is now the least recently used
    engine.run([job(c, 1)])
    assert engine.adapters == ["a/1", "c/1"]
    for name, layer in engine._lora.layers.items():  # slot 0 the base, 1 a's, 2 c's where b's were: b's are gone
        assert not layer.slot_A[0].any() and not layer.slot_B[0].any()
        for slot, subject in ((1, a), (2, c)):
            assert torch.equal(layer.slot_A[slot, :4], subject.lora[f"{name}.lora_A.weight"])
            assert torch.equal(layer.slot_B[slot, :, :4], subject.lora[f"{name}.lora_B.weight"])


def test_an_edit_of_a_lora_subject_draws_every_unet_call_with_its_slot(lora_folders, subjects):
    """An edit's UNet calls (inversion and denoising, of changing batch sizes) take one slot
    for every row, as peft's set_adapter did: the same image as on the subject's own model."""
    from pipeline.config import EditConfig
    from pipeline.model.subject import SubjectModel
    from pipeline.serving.edits import EditRequest, draw_edit

    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    request, edit = GenerationRequest("a dog on the beach", 1, 1, STEPS, 7.5, None, None, None), EditRequest("dog", None)
    [got] = engine.run([Job(request, subjects["a"], 64, 64, edit=edit)])
    assert got.error is None
    own = SubjectModel.load(lora_folders["a"])  # peft's adapter on its own base
    want = draw_edit(own.model, edit, request, own.subject_embeds, "dog", 64, 64, EditConfig())
    base = draw_edit(BlipDiffusion.from_pretrained(TINY), edit, request, own.subject_embeds, "dog", 64, 64, EditConfig())
    assert np.abs(pixels(got.images) - pixels([want])).max() <= 1
    assert np.abs(pixels([base]) - pixels([want])).max() > 20


def test_a_slot_layer_gathers_no_weights_inside_the_unet_call():
    """Each row's A and B are gathered by `use`, once a batch: inside the compiled call a slot
    layer adds a bmm and a baddbmm to its Linear, and no gather (it gathered slot_A[index] and
    slot_B[index] in every call, 128 layers x 51 calls an image on the real UNet)."""
    from torch._dynamo.backends.common import aot_autograd

    ops = []

    def record(graph, example_inputs):
        ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward

    base = Attention().eval()
    slots = LoraSlots(base, slots=2, rank=4, rows=4)
    layer = torch.compile(base.to_q, backend=aot_autograd(fw_compiler=record))
    torch._dynamo.reset()
    with torch.no_grad(), slots.use([1, 0, 2]):
        layer(torch.randn(3, 5, 16))
    assert not [op for op in ops if "index" in op or "gather" in op], ops
    assert sum("bmm" in op for op in ops) == 2, ops


def test_more_rows_than_the_slots_hold_are_refused():
    base = Attention()
    slots = LoraSlots(base, slots=2, rank=4, rows=2)
    with pytest.raises(ValueError, match="3 rows for the LoRA slots, which hold 2"):
        with slots.use([0, 1, 0]):
            pass
    with torch.no_grad(), pytest.raises(RuntimeError, match="a UNet call of 3 rows"):
        base.to_q(torch.randn(3, 5, 16))



# ---------------------------------------------------------------------------------------------
# The merged mode: rows of one slot draw it merged into a working weight, without the per-row products


def merged_peft(model: nn.Module) -> nn.Module:
    """`model` (a peft_subject) with its adapter merged into its base weights by peft."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    return model


def attend(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.to_out[0](model.to_q(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_merged_layer_holds_the_weights_peft_merges_and_draws_what_its_slot_products_draw(dtype):
    """peft merges W0 + (B A) * scale with the product in float32 on a CPU, cast to the weight's
    dtype, then added: the same weights bit for bit, in float32 and float16."""
    from peft import get_peft_model_state_dict

    torch.manual_seed(0)
    base = Attention().eval()
    peft_models = [peft_subject(base, 2, 3.0, 1).to(dtype), peft_subject(base, 4, 4.0, 2).to(dtype)]
    plain = copy.deepcopy(base).to(dtype)
    base.to(dtype)
    slots = LoraSlots(base, slots=2, rank=4, merge=True)
    numbers = [slots.load(slots.fit(get_peft_model_state_dict(m), r), alpha / r)
               for m, r, alpha in zip(peft_models, (2, 4), (3.0, 4.0), strict=True)]
    x = torch.randn(3, 5, 16)
    for slot, model in zip([0, *numbers], [plain, *peft_models], strict=True):
        with torch.no_grad(), slots.use([slot] * 3, merge=True):
            assert all(layer.mode == MERGED for layer in slots.layers.values())
            merged = attend(base, x.to(dtype)) if dtype == torch.float32 else None
        want = merged_peft(copy.deepcopy(model))
        for name, layer in slots.layers.items():
            own = want.get_submodule(name)
            assert torch.equal(layer.merged_weight, getattr(own, "base_layer", own).weight), name
        if merged is not None:  # float32: the products in the layer's own order against the merged weight
            with torch.no_grad(), slots.use([slot] * 3):
                assert (merged - attend(base, x)).abs().max() <= TOLERANCE
    assert all(layer.mode == PRODUCTS for layer in slots.layers.values())  # outside `use`: the per-row products
    for name, layer in slots.layers.items():  # W0 never written
        assert torch.equal(layer.weight, plain.get_submodule(name).weight)


def loaded(base: nn.Module, peft_models: list[nn.Module], ranks: tuple[int, ...], alphas: tuple[float, ...], **kwargs):
    """LoraSlots on `base` with merging, one slot loaded from each peft model: (slots, their numbers)."""
    from peft import get_peft_model_state_dict

    slots = LoraSlots(base, slots=len(peft_models) + 1, rank=max(ranks), merge=True, **kwargs)
    numbers = [slots.load(slots.fit(get_peft_model_state_dict(m), r), alpha / r)
               for m, r, alpha in zip(peft_models, ranks, alphas, strict=True)]
    return slots, numbers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_of_several_slots_hold_the_weights_peft_merges_for_their_own_slot(dtype):
    """Row i's working weight is its slot merged as peft merges it (and as the merged mode
    holds it), bit for bit in float32 and float16; the base slot's rows hold W0."""
    torch.manual_seed(0)
    base = Attention().eval()
    peft_models = [peft_subject(base, 2, 3.0, 1).to(dtype), peft_subject(base, 4, 4.0, 2).to(dtype)]
    plain = copy.deepcopy(base).to(dtype)
    base.to(dtype)
    slots, numbers = loaded(base, peft_models, (2, 4), (3.0, 4.0))
    rows = [numbers[1], 0, numbers[0], numbers[1]]
    with slots.use(rows, merge=True):
        assert all(layer.mode == ROW_WEIGHTS for layer in slots.layers.values())
    wants = {0: plain, **{n: merged_peft(copy.deepcopy(m)) for n, m in zip(numbers, peft_models, strict=True)}}
    for name, layer in slots.layers.items():
        for row, slot in enumerate(rows):
            own = wants[slot].get_submodule(name)
            assert torch.equal(layer.row_weight[row], getattr(own, "base_layer", own).weight), (name, row)
        assert torch.equal(layer.weight, plain.get_submodule(name).weight)  # W0 never written


def test_rows_of_several_slots_draw_what_each_slot_draws_merged_and_with_its_products():
    """float32 on the CPU: a row of the per-row merged mode (one bmm of the row's weight) draws
    bit for bit what its slot draws in the merged mode (a Linear of the same merged weight): the
    same products and sums; against the per-row products (a sum in another order) within
    TOLERANCE. A UNet call of fewer rows than the slots hold reads only its own."""
    torch.manual_seed(0)
    base = Attention().eval()
    peft_models = [peft_subject(base, 2, 3.0, 1), peft_subject(base, 4, 4.0, 2)]
    plain = copy.deepcopy(base)
    slots, numbers = loaded(base, peft_models, (2, 4), (3.0, 4.0), rows=8)
    x = torch.randn(5, 7, 16)
    rows = [numbers[0], 0, numbers[1], numbers[1], numbers[0]]
    with torch.no_grad(), slots.use(rows, merge=True):
        got = attend(base, x)
    with torch.no_grad(), slots.use(rows):
        products = attend(base, x)
    for i, slot in enumerate(rows):
        with torch.no_grad(), slots.use([slot], merge=True):
            assert torch.equal(got[i], attend(base, x[i: i + 1])[0]), i
        assert (got[i] - products[i]).abs().max() <= TOLERANCE, i
        if slot == 0:
            assert torch.equal(got[i], attend(plain, x[i: i + 1])[0])
        else:
            assert (got[i] - attend(peft_models[numbers.index(slot)], x[i: i + 1])[0]).abs().max() <= TOLERANCE


def test_rows_of_several_slots_run_one_batched_gemm_a_layer_and_no_products():
    """With merging, rows of several slots ran the Linear plus the per-row products (a bmm and
    a baddbmm a layer, 256 small kernels a UNet call, +36% of a mixed batch's denoising on an
    H200): now one batched GEMM of the rows' weights, the bias added in it, and no gather."""
    from torch._dynamo.backends.common import aot_autograd

    ops = []

    def record(graph, example_inputs):
        ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward

    base = Attention().eval()
    slots, (first,) = loaded(base, [peft_subject(base, 4, 4.0, 1)], (4,), (4.0,), rows=4)
    layer = torch.compile(base.to_q, backend=aot_autograd(fw_compiler=record))
    torch._dynamo.reset()
    with torch.no_grad(), slots.use([first, 0, first], merge=True):
        layer(torch.randn(3, 5, 16))
    assert [op for op in ops if "mm" in op or "linear" in op] == ["aten.baddbmm.default"], ops
    assert not [op for op in ops if "index" in op or "gather" in op], ops


def test_a_batch_merges_only_the_rows_whose_slot_changed():
    """Each row's slot is remembered: the next batch merges only rows of another slot than they
    hold, each new slot once a layer (then copied into its other rows)."""
    base = Attention().eval()
    slots, (a, b, c) = loaded(base, [peft_subject(base, 4, 4.0, seed) for seed in (1, 2, 3)], (4, 4, 4), (4.0,) * 3, rows=6)
    merges = []
    for name, layer in slots.layers.items():
        def counted(rows, which, merged, rank, scales, layer=layer, name=name):
            merges.extend((name, slot) for slot in merged.tolist())
            return type(layer).merge_rows(layer, rows, which, merged, rank, scales)
        layer.merge_rows = counted

    def merged_slots(rows):
        merges.clear()
        with slots.use(rows, merge=True):
            pass
        return sorted({slot for _, slot in merges}), len(merges)

    layers = len(slots.layers)
    assert merged_slots([a, b, a, b]) == ([a, b], 2 * layers)  # rows 0..3 held the base: a and b once each
    assert merged_slots([a, b, a, b]) == ([], 0)  # the same rows: nothing to merge
    assert merged_slots([a, c, a, c, 0, 0]) == ([c], layers)  # rows 4 and 5 hold the base already
    want = {0: a, 1: c, 2: a, 3: c}
    for layer in slots.layers.values():
        for row, slot in want.items():
            with torch.no_grad():
                expect = torch.empty_like(layer.weight)
                type(layer).merged_into(layer, expect, slot, 4, 1.0)
            assert torch.equal(layer.row_weight[row], expect)


def test_a_slot_freed_or_loaded_again_while_rows_hold_it_is_never_drawn_stale():
    """`free` and `load` of a slot forget the rows that hold it merged: the next batch merges them again."""
    from peft import get_peft_model_state_dict

    base = Attention().eval()
    first, second, other = (peft_subject(base, 4, alpha, seed) for seed, alpha in ((1, 4.0), (2, 2.0), (3, 4.0)))
    plain = copy.deepcopy(base)
    slots, (slot, kept) = loaded(base, [first, other], (4, 4), (4.0, 4.0))
    x = torch.randn(2, 5, 16)

    def draw():
        with torch.no_grad(), slots.use([slot, kept], merge=True):
            return attend(base, x)

    assert (draw()[0] - attend(first, x[:1])[0]).abs().max() <= TOLERANCE
    slots.free(slot)
    got = draw()  # a freed slot is zero: the base
    assert torch.equal(got[0], attend(plain, x[:1])[0])
    assert (got[1] - attend(other, x[1:])[0]).abs().max() <= TOLERANCE
    draw()
    assert slots.load(slots.fit(get_peft_model_state_dict(second), 4), 0.5) == slot  # the same slot, another subject
    got = draw()
    assert (got[0] - attend(second, x[:1])[0]).abs().max() <= TOLERANCE
    assert (got[1] - attend(other, x[1:])[0]).abs().max() <= TOLERANCE


def test_a_slot_freed_or_loaded_again_while_merged_is_never_drawn_stale():
    from peft import get_peft_model_state_dict

    base = Attention().eval()
    first, second = peft_subject(base, 4, 4.0, 1), peft_subject(base, 4, 2.0, 2)
    plain = copy.deepcopy(base)
    slots = LoraSlots(base, slots=1, rank=4, merge=True)
    x = torch.randn(2, 5, 16)
    slot = slots.load(slots.fit(get_peft_model_state_dict(first), 4), 1.0)
    with torch.no_grad(), slots.use([slot], merge=True):
        assert (attend(base, x) - attend(first, x)).abs().max() <= TOLERANCE
    slots.free(slot)
    with torch.no_grad(), slots.use([slot], merge=True):  # a freed slot is zero: the base
        assert torch.equal(attend(base, x), attend(plain, x))
    with torch.no_grad(), slots.use([slot], merge=True):
        pass
    assert slots.load(slots.fit(get_peft_model_state_dict(second), 4), 0.5) == slot  # the same slot, another subject
    with torch.no_grad(), slots.use([slot], merge=True):
        assert (attend(base, x) - attend(second, x)).abs().max() <= TOLERANCE


def test_merging_needs_the_working_weights():
    slots = LoraSlots(Attention(), slots=1, rank=4)
    assert all(layer.merged_weight is None and layer.row_weight is None for layer in slots.layers.values())  # lora_merge off: no extra memory
    with pytest.raises(ValueError, match="no merged weights"):
        slots.use([0], merge=True)
    with slots.use([0, 0]):  # the per-row mode works as before
        pass


def unet_modes(engine: Engine) -> list[str]:
    """A list that gets, per UNet call of `engine`, the mode its LoRA layers ran in (all alike)."""
    calls: list[str] = []
    layers = list(engine._lora.layers.values())

    def record(*_):
        assert len({layer.mode for layer in layers}) == 1
        calls.append(layers[0].mode)

    engine.model.unet.register_forward_pre_hook(record)
    return calls


def test_a_group_draws_merged_what_the_per_row_products_draw(subjects):
    """serve.lora_merge: a group whose rows all draw one slot (a LoRA subject, or none) runs the
    UNet merged; a group of two subjects runs each row on its own slot's merged weights, each
    request its own subject; with lora_merge off, every group adds the per-row products."""
    a, b = subjects["a"], subjects["b"]
    zero_shot = ZeroShotSubject((PIL.Image.new("RGB", (64, 64), "red"),), "dog")
    merging = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    per_row = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8, lora_merge=False)
    merged, unmerged = unet_modes(merging), unet_modes(per_row)
    groups = {
        "one LoRA subject": lambda: [job(a, 1), job(a, 2, num_images=2)],
        "no LoRA subject": lambda: [job(zero_shot, 3)],
        "two LoRA subjects": lambda: [job(a, 4), job(b, 4)],
    }
    for name, jobs in groups.items():
        merged.clear()
        got, want = merging.run(jobs()), per_row.run(jobs())
        assert merged and set(merged) == {ROW_WEIGHTS if name == "two LoRA subjects" else MERGED}, name
        for g, w in zip(got, want, strict=True):
            assert g.error is None and np.abs(pixels(g.images) - pixels(w.images)).max() <= 1, name  # float rounding at most
    assert unmerged and set(unmerged) == {PRODUCTS}
    a_alone, b_alone = (merging.run([job(subject, 4)])[0] for subject in (a, b))
    assert np.abs(pixels(got[0].images) - pixels(a_alone.images)).max() <= 1
    assert np.abs(pixels(got[1].images) - pixels(b_alone.images)).max() <= 1
    assert np.abs(pixels(a_alone.images) - pixels(b_alone.images)).max() > 20


def test_after_merged_subjects_the_base_draws_what_a_fresh_unet_draws_and_the_state_dict_stays_the_base(subjects):
    """Each merge starts from the base weights W0, which are never written: after subjects a and
    b were merged, the base draws bit for bit what a fresh UNet draws, and the UNet's state dict
    (what a checkpoint would save) is the base's while a subject is merged."""
    a, b = subjects["a"], subjects["b"]
    zero_shot = ZeroShotSubject((PIL.Image.new("RGB", (64, 64), "red"),), "dog")
    fresh = BlipDiffusion.from_pretrained(TINY).unet.state_dict()
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    for subject in (a, b):
        [drawn] = engine.run([job(subject, 1)])
        assert drawn.error is None
        state = engine.model.unet.state_dict()
        assert state.keys() == fresh.keys() and all(torch.equal(state[k], fresh[k]) for k in fresh)
        assert any(not torch.equal(layer.merged_weight, layer.weight) for layer in engine._lora.layers.values())
    assert all(drawn.error is None for drawn in engine.run([job(a, 1), job(b, 1)]))  # rows of both, each on its row weights
    state = engine.model.unet.state_dict()
    assert state.keys() == fresh.keys() and all(torch.equal(state[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(layer.row_weight[0], layer.weight) for layer in engine._lora.layers.values())
    [base] = engine.run([job(zero_shot, 1)])
    assert all(torch.equal(layer.merged_weight, layer.weight) for layer in engine._lora.layers.values())
    for lora_merge in (True, False):
        new = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8, lora_merge=lora_merge)
        [want] = new.run([job(zero_shot, 1)])
        assert np.array_equal(pixels(base.images), pixels(want.images))


def test_a_subject_loaded_into_the_slot_of_the_merged_one_is_drawn_not_the_evicted(subjects):
    """With one slot, b takes the slot a is merged from: b draws b, as a fresh engine draws it."""
    a, b = subjects["a"], subjects["b"]
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=1)
    fresh = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=1)
    [first] = engine.run([job(a, 1)])
    [got] = engine.run([job(b, 1)])
    [want] = fresh.run([job(b, 1)])
    assert np.array_equal(pixels(got.images), pixels(want.images))
    assert np.abs(pixels(got.images) - pixels(first.images)).max() > 20



@pytest.mark.parametrize("merge", [True, False], ids=["merged-rows", "products"])
def test_a_batch_of_several_slots_copies_its_indices_to_the_device_without_waiting(merge):
    """`use` with several slots sends its row and slot indices (and scales) to the device
    without the host waiting (tests/host_copies.py): a pipelined replica draws the next batch
    while the last one's denoising is still queued on the GPU."""
    base = Attention().eval()
    slots, (a, b, c) = loaded(base, [peft_subject(base, 4, 4.0, seed) for seed in (1, 2, 3)], (4, 4, 4), (4.0,) * 3, rows=6)
    slots.layers = {name: layer.to("meta") for name, layer in slots.layers.items()}
    slots.device = torch.device("meta")
    with HostCopies() as copies, slots.use([a, b, c, a], merge=merge):
        pass
    assert copies.seen and copies.waiting == []


def test_once_its_subjects_are_loaded_a_draw_copies_nothing_to_the_device_that_the_host_waits_for(subjects):
    """The whole draw on PyTorch's meta device, up to the VAE: a batch of several LoRA subjects,
    then one of a single subject, after a first draw loaded them. Tokens, noise, slot indices:
    every copy from host memory is non-blocking (tests/host_copies.py)."""

    class Decoded(Exception):
        """Raised at the VAE: meta tensors cannot become pixels."""

    model = BlipDiffusion.from_pretrained(TINY)
    for part in (model.unet, model.vae, model.text_encoder, model.qformer):
        part.to("meta")
    model.vae.decode = lambda *args, **kwargs: (_ for _ in ()).throw(Decoded())
    engine = Engine(model, max_batch_images=8, max_subjects=8, max_lora_adapters=4)
    a, b, c = (subjects[name] for name in "abc")
    engine.draw([job(s, seed) for seed, s in enumerate((a, b, c))])  # loads their embeddings and LoRA weights
    for batch in ((c, b, a), (a, a, a)):
        with HostCopies() as copies:
            drawn = engine.draw([job(s, seed) for seed, s in enumerate(batch)])
        assert all(isinstance(j.error, Decoded) for j in drawn), [j.error for j in drawn]
        assert copies.seen and copies.waiting == []


def test_loading_a_subject_into_a_slot_copies_nothing_the_host_waits_for():
    """A LoRA subject loaded on first use (or after an eviction) while the last batch still
    denoises: its weights reach the slots without the host waiting (tests/host_copies.py)."""
    from peft import get_peft_model_state_dict

    base = Attention().eval()
    lora = get_peft_model_state_dict(peft_subject(base, 4, 4.0, 1))
    slots = LoraSlots(base.to("meta"), slots=2, rank=4, merge=True)
    with HostCopies() as copies:
        slots.load(slots.fit(lora, 4), 1.0)
    assert copies.seen and copies.waiting == []
