"""LoRA subjects as slots of fixed tensors in the base UNet, so a compiled UNet never recompiles
for them (the batched gather of S-LoRA and punica).

Each UNet Linear named by pipeline.model.subject.LORA_TARGETS becomes a LoraSlotLinear: the same
weight and bias, plus buffers A (S+1, r_max, in), B (S+1, out, r_max) and scale (S+1,) in the
model's dtype and device. Row i of a UNet call adds its slot's update,

    y_i = x_i W^T + b + scale[k_i] * (x_i A[k_i]^T) B[k_i]^T,    k_i = the slot of row i,

peft's LoraLayer forward (`result + lora_B(lora_A(x)) * scaling`, dropout off in inference)
with each row's adapter. Slot 0 stays zero: rows without a subject add exactly 0.0, so they
draw the base. A subject of rank r < r_max fills the first r rows of A and columns of B; the
zeros after them add nothing.

Why not peft's named adapters: torch.compile guards on the active adapter's name and on the
per-row name lists, so every switch, new adapter and batch composition recompiled the whole
UNet (minutes with max-autotune, then eager after Dynamo's recompile limit). Here loading a
subject copies its weights into a slot in place, and `LoraSlots.use` copies each row's slot
(its A, and its B times its scale) into fixed per-row buffers before a batch's UNet calls: the
graph sees the same buffers whatever is drawn.

Why per-row buffers filled once a batch: gathering each row's A, B and scale inside the UNet
call cost three index kernels per layer per call (128 layers, 51 calls an image); filled by `use`, they are
gathered once a batch, and each layer adds only a bmm and a baddbmm (the update and the add in
one cuBLAS call) to its Linear.

Why a merged mode: those two products are still 256 small kernels a UNet call, paid even when
every row draws the same slot (one subject's batch, or slot 0: zero-shot and embedding
subjects), the common case at one client. With `merge`, `use` of a single slot runs each layer
as a plain Linear on a working weight W = W0 + scale[k] * B[k] A[k] (peft's merge as it runs on
a CPU: the product in float32, cast to the weight's dtype, added to W0; one matmul a layer, on
the device, when the merged slot changes), or W = W0 for slot 0. W0 stays the
layer's own weight Parameter, never written, so the UNet's state dict is the base's whatever is
merged, and every merge starts from it (no rounding drift from adding and subtracting). The
working weight is a non-persistent buffer (device memory: one more copy of the target layers'
weights, 178 MiB in float16 for SD 1.5's UNet), merged in place, so a compiled UNet's graphs
(CUDA graphs too) read the same tensor whatever subject is merged. The mode is a Python string
attribute of each layer (`mode`: PRODUCTS, MERGED or ROW_WEIGHTS) read in forward: Dynamo
guards on it, so a compiled UNet has its graphs (one per batch-size variant) once per mode and
never recompiles for a subject. The slot last merged is remembered: groups of the same
subject one after another merge once; `load` or `free` of that slot forgets it. Outside `use`
every layer is back in the per-row mode with zero rows: it draws the base.

Why per-row merged weights: a batch of several subjects still paid the two products. On an
H200 (bench_serve --compile, SD 1.5, 50 steps, 512 px, 16 clients, 8 images = 16 UNet rows a
batch on average), 100 LoRA subjects in mixed batches drew 3.28 images/s against 3.56 for one
subject merged (BENCHMARKS.md "Serving"): the issue allows 5%. With `merge`, `use` of several slots fills each layer's
`row_weight` (rows, out, in), row i with slot slots[i] merged as above (each distinct slot
merged once, a batch's new slots of one rank together, then copied into their rows; slot 0:
W0), and forward is one batched GEMM,
`bmm(x_i, W_i^T)` (+ bias, in the same baddbmm): the activations are read once, as by the
plain Linear, instead of the Linear plus two skinny products; what it adds is that each row
reads its own weight (a UNet call of 16 rows reads 16 x 178 MiB of weights in float16 on SD
1.5, where the plain Linear reads 178 MiB). Cost: device memory of `rows` copies of the target
layers' weights (5.6 GiB in float16 at the server's 32 rows, 2 x serve.max_batch_images), and
a merge of each changed row's slot in every layer once a batch, never a step. Each row's
slot is remembered: a batch re-merges only the rows whose slot changed, and `load` or `free`
of a slot forgets the rows holding it. A UNet call of n rows reads row_weight[:n]. The mode is
the same Python attribute (`mode`) as the merged one: a third set of graphs per batch-size
variant, never a recompile per subject or mix. Without `merge` (serve.lora_merge off) a batch
of several slots adds the per-row products, and no working weights are allocated.

No Ray, HTTP or MLflow; the engine (engine.py) picks the slots and sets the rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from pipeline.model.blip_diffusion import to_device_async

log = logging.getLogger(__name__)

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"  # peft's state-dict key suffixes (adapter name removed)
BASE_SLOT = 0  # the slot of rows without a LoRA subject: all zeros
# A LoraSlotLinear's forward mode (its `mode`; Dynamo guards on it: one set of graphs per mode).
PRODUCTS = "products"  # each row adds its slot's update, x A^T B^T, to the base Linear
MERGED = "merged"  # every row draws one slot merged into merged_weight
ROW_WEIGHTS = "row_weights"  # row i draws the slot merged into row_weight[i]


class LoraUnfit(ValueError):
    """LoRA weights that the slots cannot hold: a rank above r_max, a layer the UNet does not
    have, or a shape its layer does not take."""


class LoraSlotLinear(nn.Linear):
    """A Linear with `slots` + 1 LoRA slots of rank `rank` and `rows` per-row buffers (see the
    module docstring). It holds the base Linear's own weight and bias Parameters, so the UNet's
    state dict is unchanged; the slot and row buffers are not persistent. Rows without a slot
    (outside `LoraSlots.use`) hold zeros and add exactly 0.0. With `merge`, also a working
    weight `merged_weight` (a copy of the weight, then one slot merged into it) and per-row
    working weights `row_weight` (rows, out, in), which forward uses instead of the per-row
    products while `mode` is MERGED or ROW_WEIGHTS."""

    def __init__(self, base: nn.Linear, slots: int, rank: int, rows: int, merge: bool = False) -> None:
        with torch.device("meta"):  # no second copy of the weight: the base's Parameters are taken below
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("slot_A", torch.zeros(slots + 1, rank, base.in_features, **like), persistent=False)
        self.register_buffer("slot_B", torch.zeros(slots + 1, base.out_features, rank, **like), persistent=False)
        self.register_buffer("slot_scale", torch.zeros(slots + 1, **like), persistent=False)
        self.register_buffer("row_A", torch.zeros(rows, rank, base.in_features, **like), persistent=False)
        self.register_buffer("row_B", torch.zeros(rows, base.out_features, rank, **like), persistent=False)  # scale included
        weight = base.weight.detach()
        merged = weight.clone() if merge else None  # the base slot merged: W0
        self.register_buffer("merged_weight", merged, persistent=False)
        row_weight = weight.expand(rows, -1, -1).clone() if merge else None  # every row on the base slot: W0
        self.register_buffer("row_weight", row_weight, persistent=False)
        self.mode = PRODUCTS  # forward's mode: Dynamo guards on it (one set of graphs per mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, ..., in) -> (N, ..., out); row i adds the update of the slot in row_A[i], row_B[i],
        or, while MERGED, every row draws the slot merged into `merged_weight`, or, while
        ROW_WEIGHTS, row i draws the slot merged into row_weight[i]."""
        if self.mode == MERGED:
            return nn.functional.linear(x, self.merged_weight, self.bias)
        n = x.shape[0]
        if n > self.row_A.shape[0]:
            raise RuntimeError(f"a UNet call of {n} rows; the LoRA slots hold {self.row_A.shape[0]} (serve.max_batch_images)")
        flat = x.reshape(n, -1, x.shape[-1])  # (N, L, in)
        if self.mode == ROW_WEIGHTS:  # one batched GEMM, the bias added in it
            weights = self.row_weight[:n].transpose(1, 2)
            out = torch.bmm(flat, weights) if self.bias is None else torch.baddbmm(self.bias, flat, weights)
            return out.view(*x.shape[:-1], self.out_features)
        out = super().forward(x)
        down = torch.bmm(flat, self.row_A[:n].transpose(1, 2))  # (N, L, r_max)
        return torch.baddbmm(out.reshape(n, -1, out.shape[-1]), down, self.row_B[:n].transpose(1, 2)).view(out.shape)

    def select_rows(self, index: torch.Tensor) -> None:
        """Rows 0..len(index)-1 take the slots `index` (LongTensor on the device), the rest zeros."""
        n = index.shape[0]
        self.row_A[:n].copy_(self.slot_A[index])
        self.row_B[:n].copy_(self.slot_B[index] * self.slot_scale[index].view(-1, 1, 1))
        self.row_A[n:].zero_()
        self.row_B[n:].zero_()

    @torch.no_grad()
    def merge(self, slot: int, rank: int, scale: float) -> None:
        """merged_weight = W0 + scale * B[slot] A[slot] over the slot's first `rank` ranks (`merged_into`)."""
        self.merged_into(self.merged_weight, slot, rank, scale)

    @torch.no_grad()
    def merge_rows(self, rows: torch.Tensor, which: torch.Tensor, slots: torch.Tensor, rank: int, scales: torch.Tensor) -> None:
        """row_weight[rows[j]] = the slot slots[which[j]] merged with its scale scales[which[j]],
        `merged_into`'s arithmetic for every slot of `slots` (all of rank `rank`) together, each
        slot once however many rows take it. Rank 0: W0. Index tensors on the device, scales
        float32. One mm a slot, not a bmm of all: the bmm sums in another order, and rows must
        hold what peft merges bit for bit; the casts, scales and adds around them are batched."""
        if rank == 0:
            self.row_weight.index_copy_(0, rows, self.weight.expand(rows.shape[0], -1, -1))
            return
        down, up = self.slot_A[slots, :rank].float(), self.slot_B[slots, :, :rank].float()
        delta = torch.empty(slots.shape[0], self.out_features, self.in_features, dtype=torch.float32, device=down.device)
        for j in range(slots.shape[0]):
            torch.mm(up[j], down[j], out=delta[j])
        merged = torch.add(self.weight, delta.mul_(scales.view(-1, 1, 1)).to(self.weight.dtype))
        self.row_weight.index_copy_(0, rows, merged if merged.shape[0] == rows.shape[0] else merged.index_select(0, which))

    @torch.no_grad()
    def merged_into(self, out: torch.Tensor, slot: int, rank: int, scale: float) -> None:
        """out = W0 + scale * B[slot] A[slot] over the slot's first `rank` ranks, as peft merges:
        the product in float32, cast to the weight's dtype, then added to W0 (the weight
        Parameter, never written: each merge starts from it). Slot 0 (rank 0): W0."""
        if rank == 0:
            out.copy_(self.weight)
            return
        delta = torch.mm(self.slot_B[slot, :, :rank].float(), self.slot_A[slot, :rank].float()).mul_(scale)
        torch.add(self.weight, delta.to(self.weight.dtype), out=out)


class LoraSlots:
    """`slots` LoRA slots (1..slots; 0 is the base) of rank up to `rank` in every LORA_TARGETS
    Linear of `unet`, installed in place. Installing on a UNet that has slots already replaces
    them (empty): one engine per model. With `merge`, each layer also holds a working weight and
    per-row working weights for `use(..., merge=True)` (the module docstring's merged and
    per-row merged modes)."""

    def __init__(self, unet: nn.Module, slots: int, rank: int, rows: int = 8, merge: bool = False) -> None:
        from pipeline.model.subject import LORA_TARGETS

        self.rank, self.rows, self.can_merge = rank, rows, merge
        self._ranks = [0] * (slots + 1)  # each slot's rank (0: empty) and scale, for merging
        self._scales = [0.0] * (slots + 1)
        self._merged: int | None = BASE_SLOT if merge else None  # the slot in every merged_weight, None: none whole
        # The slot in every layer's row_weight[i], None: not whole (cut short, or its slot changed).
        self._row_slots: list[int | None] = [BASE_SLOT if merge else None] * rows
        self.device = next(unet.parameters()).device
        self.layers: dict[str, LoraSlotLinear] = {}
        for name, module in list(unet.named_modules()):
            if not any(name == target or name.endswith(f".{target}") for target in LORA_TARGETS):  # peft's target match
                continue
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{name} is a {type(module).__name__}, not a Linear: LoRA slots go on the plain base UNet")
            layer = LoraSlotLinear(module, slots, rank, rows, merge)
            unet.set_submodule(name, layer)
            self.layers[name] = layer
        self._free = list(range(slots, BASE_SLOT, -1))  # pop() takes the lowest free slot
        size = sum(b.numel() * b.element_size() for layer in self.layers.values() for b in layer.buffers())
        log.info("LoRA slots: %d of rank %d for up to %d rows in %d layers%s, %.1f MB", slots, rank, rows, len(self.layers),
                 " and their merged and per-row merged weights" if merge else "", size / 2**20)

    def fit(self, lora: Mapping[str, torch.Tensor], rank: int) -> list[tuple[LoraSlotLinear, bool, torch.Tensor]]:
        """(layer, whether it is A, the tensor) for each tensor of a subject's
        peft state dict `lora` (keys "<module>.lora_A.weight" (rank, in), "<module>.lora_B.weight"
        (out, rank)) of rank `rank`. LoraUnfit for a rank above the slots' or a key or shape the
        UNet has no place for. Layers that `lora` leaves out add nothing, as peft's B starts at zero."""
        if rank > self.rank:
            raise LoraUnfit(f"LoRA rank {rank} is above serve.max_lora_rank ({self.rank}); raise it to serve this subject")
        found = []
        for key, tensor in lora.items():
            suffix = LORA_A if key.endswith(LORA_A) else LORA_B if key.endswith(LORA_B) else None
            layer = self.layers.get(key[: -len(suffix)]) if suffix else None
            if layer is None:
                raise LoraUnfit(f"LoRA weights that the base UNet has no place for ({key})")
            want = (rank, layer.in_features) if suffix == LORA_A else (layer.out_features, rank)
            if tuple(tensor.shape) != want:
                raise LoraUnfit(f"LoRA weights {key} of shape {tuple(tensor.shape)}; rank {rank} in this UNet takes {want}")
            found.append((layer, suffix == LORA_A, tensor))
        return found

    def load(self, weights: list[tuple[LoraSlotLinear, bool, torch.Tensor]], scale: float) -> int:
        """Copy `fit`'s weights into a free slot in place (cast to the slots' dtype and device),
        with `scale` (lora_alpha / rank); returns the slot. RuntimeError when none is free."""
        if not self._free:
            raise RuntimeError("every LoRA slot is taken: free one first (the engine's LRU evicts before it loads)")
        slot = self._free.pop()
        self._forget_merge(slot)
        try:
            for layer, is_a, tensor in weights:  # a free slot is zero: ranks below r_max keep zeros after theirs
                # slot_A (S+1, r_max, in) <- (rank, in); slot_B (S+1, out, r_max) <- (out, rank)
                target = layer.slot_A[slot, : tensor.shape[0]] if is_a else layer.slot_B[slot, :, : tensor.shape[1]]
                # Without waiting: a plain copy from host memory would wait for the batch still
                # denoising on the GPU (a subject's first use, or one loaded after an eviction).
                target.copy_(to_device_async(tensor.to(target.dtype), self.device))
            for layer in self.layers.values():
                layer.slot_scale[slot] = scale
        except BaseException:  # half-copied weights must never be drawn
            self.free(slot)
            raise
        self._ranks[slot] = max((t.shape[0] if is_a else t.shape[1] for _, is_a, t in weights), default=0)
        self._scales[slot] = scale
        return slot

    def free(self, slot: int) -> None:
        """Zero `slot` in every layer (its rows then draw the base) and make it free again."""
        self._forget_merge(slot)
        self._ranks[slot], self._scales[slot] = 0, 0.0
        for layer in self.layers.values():
            layer.slot_A[slot].zero_()
            layer.slot_B[slot].zero_()
            layer.slot_scale[slot] = 0.0
        self._free.append(slot)
        self._free.sort(reverse=True)

    def use(self, slots: list[int], merge: bool = False, per_row: bool = False) -> AbstractContextManager[None]:
        """Within the block, UNet batch row i adds slot slots[i]'s update; one entry: every row
        adds it. With `merge` (ValueError without working weights), the layers draw the slots
        merged instead of adding the per-row products: one slot for every row, merged into their
        weight (merged mode); several, each row its own slot merged into its row weight
        (per-row merged mode), also for one slot with `per_row` (the warm-up draws that mode's
        graphs with one subject). The rows draw the base again after it. More entries than
        `rows`: ValueError."""
        if len(slots) > self.rows:
            raise ValueError(f"{len(slots)} rows for the LoRA slots, which hold {self.rows}")
        if not merge:
            return self._per_row(slots)
        if not self.can_merge:
            raise ValueError("these LoRA slots have no merged weights (serve.lora_merge was off when they were installed)")
        if len(set(slots)) == 1 and not per_row:
            return self._merged_mode(slots[0])
        return self._row_weights_mode(slots * (self.rows if len(slots) == 1 else 1))

    @contextmanager
    def _per_row(self, slots: list[int]) -> Iterator[None]:
        index = to_device_async(torch.tensor(slots * (self.rows if len(slots) == 1 else 1), dtype=torch.long), self.device)
        for layer in self.layers.values():
            layer.select_rows(index)
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.row_A.zero_()
                layer.row_B.zero_()

    @contextmanager
    def _merged_mode(self, slot: int) -> Iterator[None]:
        """Every layer draws `slot` merged; the rows stay zero (outside `use` they are), so the
        per-row mode after the block draws the base. The merged weights are kept for the next block."""
        if self._merged != slot:
            self._merged = None  # a merge cut short leaves no slot's weights whole
            for layer in self.layers.values():
                layer.merge(slot, self._ranks[slot], self._scales[slot])
            self._merged = slot
        with self._mode(MERGED):
            yield

    @contextmanager
    def _row_weights_mode(self, slots: list[int]) -> Iterator[None]:
        """Each layer's row_weight[i] holds slot slots[i] merged, then every layer draws its row
        weights. Only rows whose slot changed since they were merged are merged again, each slot
        once a layer, all of a rank in one product (`_merge_groups`); rows from len(slots) on keep what they hold (a UNet call reads only its
        first rows). The rows A and B stay zero, as in the merged mode."""
        stale: dict[int, list[int]] = {}  # slot -> the rows to merge it into
        for row, slot in enumerate(slots):
            if self._row_slots[row] != slot:
                stale.setdefault(slot, []).append(row)
                self._row_slots[row] = None  # a merge cut short leaves the row unknown
        groups = self._merge_groups(stale)
        for layer in self.layers.values():
            for group in groups:
                layer.merge_rows(*group)
        for slot, rows in stale.items():
            for row in rows:
                self._row_slots[row] = slot
        with self._mode(ROW_WEIGHTS):
            yield

    def _merge_groups(self, stale: dict[int, list[int]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]]:
        """`LoraSlotLinear.merge_rows`'s arguments for the rows `stale` maps each slot to: one
        group per rank (a product's inner size), so that every layer merges all of a batch's new
        slots with one product a slot and a few batched kernels around them, rather than a
        handful a slot (~7,000 launches for a batch of 8 subjects; BENCHMARKS.md "Serving" found
        the mixed batches' cost inside the UNet calls, not here)."""
        by_rank: dict[int, dict[int, list[int]]] = {}
        for slot, rows in stale.items():
            by_rank.setdefault(self._ranks[slot], {})[slot] = rows
        groups = []
        for rank, slots in by_rank.items():
            rows = [row for held in slots.values() for row in held]
            which = [j for j, held in enumerate(slots.values()) for _ in held]
            # Copied without waiting: a plain .to() would wait for the previous batch's work
            # still queued on the GPU, and the replica could not draw ahead of it (drawn.py).
            groups.append((
                to_device_async(torch.tensor(rows, dtype=torch.long), self.device),
                to_device_async(torch.tensor(which, dtype=torch.long), self.device),
                to_device_async(torch.tensor(list(slots), dtype=torch.long), self.device),
                rank,
                to_device_async(torch.tensor([self._scales[slot] for slot in slots], dtype=torch.float32), self.device),
            ))
        return groups

    @contextmanager
    def _mode(self, mode: str) -> Iterator[None]:
        """Every layer runs in `mode` within the block, in the per-row products mode after it."""
        for layer in self.layers.values():
            layer.mode = mode
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.mode = PRODUCTS

    def _forget_merge(self, slot: int) -> None:
        """`slot`'s weights change: its merge, if it is the one held, and the rows holding it are stale."""
        if self._merged == slot:
            self._merged = None
        self._row_slots = [None if held == slot else held for held in self._row_slots]
