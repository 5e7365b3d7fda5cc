"""CPU cost per photo of the data plan after matting, on this machine.

Default mode: the write stage's encoding (`stages.write.encode_batch`) alone. Rows are the bundled
sample's photos resized to SIZE px, each with K composite rows (the composite is the photo
shifted, so it compresses like a photo), a radial alpha and its trimap. Prints milliseconds of
encoding per photo and bytes per row for each K, best of 3 passes.

`--post-matte`: the whole CPU task that follows the matte actor in `pipeline.data.plan` (filter ->
composite -> encode -> Parquet write), run the way a Ray Data task runs it: the matte actor's
output block (photo, trimap, alpha, foreground as tensor columns) is cut into batches of 4 rows,
each function's output batch becomes an Arrow block again, and the blocks go to a Parquet file.
It prints ms per photo for each sub-step, best of --passes, and writes every output row's
bytes to --dump (a .npz), so that two versions of the stages can be checked for equal output.
`--unfused` converts to an Arrow block after each function (the plan before they were fused
into one function); `--matte-output` also times the matte actor's own output conversion.

`--answer`: the serving answer's PNGs (`pipeline.serving.api.image_answer`, at its
PNG_COMPRESS_LEVEL) against PIL's default level 6 as the baseline, ms and KiB per photo.

    python benchmarks/bench_encode.py [--size 512] [--photos 16] [--format jpeg]
    python benchmarks/bench_encode.py --post-matte [--per-photo 2] [--photos 32] [--unfused]
    python benchmarks/bench_encode.py --answer
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stages.write import encode_batch

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "dreambench-mini"
BACKGROUNDS = SAMPLE.parent / "backgrounds"  # the bundled set (named, so an older checkout on PYTHONPATH finds it too)


def make_batch(photos: list[np.ndarray], per_photo: int, size: int) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    alpha = np.clip(1.2 - np.hypot(yy - size / 2, xx - size / 2) / (0.4 * size), 0, 1).astype(np.float32)
    trimap = np.where(alpha > 0.9, 1.0, np.where(alpha < 0.1, 0.0, 0.5)).astype(np.float32)
    n = len(photos) * per_photo
    cols = {name: np.empty(n, dtype=object) for name in ("image", "composite", "alpha", "trimap")}
    for p, image in enumerate(photos):
        for k in range(per_photo):
            i = p * per_photo + k
            cols["image"][i], cols["alpha"][i], cols["trimap"][i] = image, alpha, trimap
            cols["composite"][i] = np.roll(image, 37 * (k + 1), axis=1)
    cols["source_uri"] = np.array([f"s/{i // per_photo}.jpg" for i in range(n)], dtype=object)
    cols["reject_stage"] = np.full(n, "", dtype=object)
    cols["reject_reason"] = np.full(n, "", dtype=object)
    return cols


def matte_output(photos: list[np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The columns a batch has when it leaves the matte actor: what the CPU task receives.

    Each alpha is a soft disc (a ramp ~20% of the side wide, so the subject box covers most of
    the photo, as for a centred subject) at a centre that moves from photo to photo."""
    n = len(photos)
    yy, xx = np.mgrid[:size, :size]
    obj = lambda values: np.array(values, dtype=object)  # noqa: E731
    cols = {name: np.empty(n, dtype=object) for name in ("image", "trimap", "alpha", "foreground")}
    for i, image in enumerate(photos):
        cy, cx = size / 2 + 0.05 * size * np.sin(i), size / 2 + 0.05 * size * np.cos(i)
        alpha = np.clip(1.2 - np.hypot(yy - cy, xx - cx) / (0.35 * size), 0, 1).astype(np.float32)
        cols["image"][i], cols["foreground"][i], cols["alpha"][i] = image, image, alpha
        cols["trimap"][i] = np.where(alpha > 0.9, 1.0, np.where(alpha < 0.1, 0.0, 0.5)).astype(np.float32)
    cols.update(
        subject_id=obj(["dog"] * n),
        category=obj(["dog"] * n),
        source_uri=obj([f"dog/{i:06d}.jpg" for i in range(n)]),
        source_path=obj([f"/photos/dog/{i:06d}.jpg" for i in range(n)]),
        source_sha256=obj([f"{i:064x}" for i in range(n)]),
        reject_stage=obj([""] * n),
        reject_reason=obj([""] * n),
        width=np.full(n, size),
        height=np.full(n, size),
    )
    for stage in ("decode", "segment", "trimap", "matte"):
        cols[f"t_{stage}"] = np.full(n, 1e-3)
    return cols


class _RayTaskIO:
    """Ray Data's own batch <-> block conversions of a fused map task (ray 2.60 internals)."""

    def __init__(self) -> None:
        from ray.data._internal.block_batching.block_batching import batch_blocks
        from ray.data._internal.output_buffer import BlockOutputBuffer, OutputBlockSizeOption
        from ray.data.context import DataContext

        self._batch_blocks = batch_blocks
        self._buffer = BlockOutputBuffer
        self._option = OutputBlockSizeOption.of(target_max_block_size=DataContext.get_current().target_max_block_size)

    def batches(self, blocks, batch_size: int):
        return self._batch_blocks(blocks=iter(blocks), stats=None, batch_size=batch_size, batch_format="default")

    def blocks(self, batches) -> list:
        buffer, out = self._buffer(self._option), []
        for batch in batches:
            buffer.add_batch(batch)
            while buffer.has_next():
                out.append(buffer.next())
        buffer.finalize()
        while buffer.has_next():
            out.append(buffer.next())
        return out


def post_matte_pass(blocks: list, args: argparse.Namespace, backgrounds, work: Path) -> tuple[dict[str, float], list]:
    """One pass of the CPU task over `blocks`: seconds per sub-step and the encoded blocks."""
    import pyarrow.parquet as pq

    from stages.composite import composite_batch
    from stages.filter import filter_batch
    from stages.write import DATA_SCHEMA, split_block

    io = _RayTaskIO()
    steps = (
        ("filter", lambda b: filter_batch(b, min_area=0.01, max_area=0.95)),
        (
            "composite",
            lambda b: composite_batch(
                b, backgrounds=backgrounds, per_photo=args.per_photo, seed=0, scale_min=0.4, scale_max=0.9
            ),
        ),
        ("encode", lambda b: encode_batch(b, image_format=args.format, jpeg_quality=95, dataset_version="bench")),
    )
    seconds = dict.fromkeys(
        ["ray: block -> batches", "filter", "composite", "encode", "ray: batches -> block", "parquet write"], 0.0
    )

    def timed(name, fn, *a):
        start = time.perf_counter()
        result = fn(*a)
        seconds[name] += time.perf_counter() - start
        return result

    # One Arrow round trip per function (--unfused) or one for the chain (a fused function).
    groups = [[s] for s in steps] if args.unfused else [list(steps)]
    for group in groups:
        outputs = []
        batches = io.batches(blocks, args.batch_size)
        while True:
            batch = timed("ray: block -> batches", next, batches, None)
            if batch is None:
                break
            for name, fn in group:
                batch = timed(name, fn, batch)
            outputs.append(batch)
        blocks = timed("ray: batches -> block", io.blocks, outputs)

    def write() -> None:
        with pq.ParquetWriter(work / "part.parquet", DATA_SCHEMA) as writer:
            for block in blocks:
                writer.write_table(split_block(block)[0], row_group_size=64)

    timed("parquet write", write)
    return seconds, blocks


def post_matte(args: argparse.Namespace, photos: list[np.ndarray]) -> None:
    from ray.data.block import BlockAccessor

    from pipeline.data.backgrounds import list_backgrounds

    backgrounds = list_backgrounds(BACKGROUNDS)
    batch = matte_output(photos, args.size)
    n = len(photos)
    if args.matte_output:  # in the actor, serial with its GPU work
        io = _RayTaskIO()
        best = min(_clock(lambda: io.blocks([dict(batch)])) for _ in range(args.passes))
        print(json.dumps({"step": "matte actor: batch -> block", "ms_per_photo": round(best / n * 1e3, 2)}))
    # The matte actor's output, cut into blocks the size the plan's CPU tasks receive.
    whole = BlockAccessor.batch_to_block(batch)
    blocks = [whole.slice(s, min(s + args.block_photos, n)) for s in range(0, n, args.block_photos)]
    best, best_seconds, out = float("inf"), {}, []
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.passes):
            seconds, out = post_matte_pass(blocks, args, backgrounds, Path(work))
            if sum(seconds.values()) < best:
                best, best_seconds = sum(seconds.values()), seconds
    result = {
        "per_photo": args.per_photo,
        "photos": n,
        "unfused": args.unfused,
        "batch_size": args.batch_size,
        "ms_per_photo": {k: round(v / n * 1e3, 2) for k, v in best_seconds.items()},
        "total_ms_per_photo": round(best / n * 1e3, 2),
    }
    print(json.dumps(result))
    if args.dump:
        import pyarrow as pa

        table = pa.concat_tables(out)
        np.savez(
            args.dump,
            **{
                c: np.array(table[c].to_pylist(), dtype=object)
                for c in ("image", "composite", "alpha", "trimap", "placement", "background_id", "seed")
            },
        )


def _clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def answer_pngs(photos: list[np.ndarray], passes: int) -> None:
    """ms and KiB per photo of `image_answer` (PNG and base64) at its PNG_COMPRESS_LEVEL and at
    PIL's default level 6 (the baseline), best of `passes`."""
    from pipeline.serving import api
    from pipeline.serving.requests import GenerationRequest

    images = [Image.fromarray(p) for p in photos]
    request = GenerationRequest("bench", len(images), 0, 50, 7.5, None, None, None)
    chosen = api.PNG_COMPRESS_LEVEL
    for level in (6, chosen):
        api.PNG_COMPRESS_LEVEL = level
        best = float("inf")
        for _ in range(passes):
            start = time.perf_counter()
            answer = api.image_answer(images, request, "bench", None, "bench")
            best = min(best, time.perf_counter() - start)
        size = sum(len(data) * 3 // 4 for data in answer["images"])
        print(json.dumps({"compress_level": level, "ms_per_photo": round(best / len(images) * 1e3, 1),
                          "kib_per_photo": round(size / len(images) / 1024)}))
    api.PNG_COMPRESS_LEVEL = chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--photos", type=int, default=None, help="default 16, or 32 with --post-matte")
    parser.add_argument("--format", choices=("jpeg", "png"), default="jpeg")
    parser.add_argument("--post-matte", action="store_true", help="the whole CPU task after matting (see above)")
    parser.add_argument("--per-photo", type=int, default=2, help="--post-matte: composites per photo (K)")
    parser.add_argument("--block-photos", type=int, default=32, help="--post-matte: photos per input block")
    parser.add_argument("--batch-size", type=int, default=None, help="--post-matte: rows per batch; default the plan's")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--unfused", action="store_true", help="--post-matte: an Arrow block after each function")
    parser.add_argument("--matte-output", action="store_true", help="--post-matte: also the matte actor's output build")
    parser.add_argument("--dump", type=Path, default=None, help="--post-matte: write the output rows here (.npz)")
    parser.add_argument("--answer", action="store_true", help="the serving answer's PNGs against PIL's default level (see above)")
    args = parser.parse_args()
    if args.batch_size is None:
        try:
            from pipeline.data.plan import _FINISH_BATCH_SIZE as plan_batch_size
        except ImportError:  # a checkout from before filter_composite_encode: 4 rows a batch
            plan_batch_size = 4
        args.batch_size = plan_batch_size
    count = args.photos or (32 if args.post_matte else 16)
    files = sorted(SAMPLE.glob("*/*.jpg"))
    files = [files[i % len(files)] for i in range(count)]
    photos = [np.asarray(Image.open(f).convert("RGB").resize((args.size, args.size))) for f in files]
    if args.post_matte:
        post_matte(args, photos)
        return
    if args.answer:
        answer_pngs(photos, args.passes)
        return
    results = []
    for per_photo in (1, 2, 4):
        batch = make_batch(photos, per_photo, args.size)
        best = float("inf")
        for _ in range(args.passes):
            start = time.perf_counter()
            out = encode_batch(batch, image_format=args.format, jpeg_quality=95, dataset_version="bench")
            best = min(best, time.perf_counter() - start)
        row_bytes = sum(len(out[c][0]) for c in ("image", "composite", "alpha", "trimap"))
        results.append(
            {"per_photo": per_photo, "ms_per_photo": round(best / len(photos) * 1e3, 2), "bytes_first_row": row_bytes}
        )
        print(json.dumps(results[-1]))


if __name__ == "__main__":
    main()
