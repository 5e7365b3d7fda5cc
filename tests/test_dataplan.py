"""The plan's Ray Data wiring: the fused CPU task after matting."""

import numpy as np

from pipeline.backgrounds import list_backgrounds
from pipeline.config import load_config
from pipeline.dataplan import filter_composite_encode, finish_args
from stages.composite import composite_batch
from stages.filter import filter_batch
from stages.write import encode_batch


def test_the_fused_cpu_task_is_filter_composite_encode_in_order():
    """filter_composite_encode with the plan's arguments gives the rows of the three stages
    called one after another (a rejected row and K=2 composites of the accepted ones)."""
    rng = np.random.default_rng(0)
    n = 3
    images = np.empty(n, dtype=object)
    alphas = np.empty(n, dtype=object)
    for i in range(n):
        images[i] = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        alphas[i] = np.zeros((40, 48), np.float32)
        alphas[i][8 : 30 - 10 * (i == 2), 10:40] = 1.0 if i != 2 else 0.0  # photo 2: empty matte
    obj = lambda *xs: np.array(xs, dtype=object)  # noqa: E731
    batch = {
        "subject_id": obj("dog", "dog", "dog"), "category": obj("dog", "dog", "dog"),
        "source_uri": obj("a", "b", "c"), "source_sha256": obj("aa", "bb", "cc"),
        "reject_stage": obj("", "", ""), "reject_reason": obj("", "", ""),
        "image": images, "foreground": images, "alpha": alphas, "trimap": alphas,
        "width": np.full(n, 48), "height": np.full(n, 40),
    }  # fmt: skip
    config = load_config(overrides=["data.composite.per_photo=2"])
    args = finish_args(config, list_backgrounds(None), "v0003")
    fused = filter_composite_encode({k: v.copy() for k, v in batch.items()}, **args)
    chained = encode_batch(
        composite_batch(filter_batch(dict(batch), **args["filter_args"]), **args["composite_args"]),
        **args["encode_args"],
    )
    assert list(fused["reject_stage"]) == ["", "", "", "", "filter"]
    assert fused.keys() == chained.keys()
    for name in fused:
        if not name.startswith("t_"):
            assert list(fused[name]) == list(chained[name]), name
