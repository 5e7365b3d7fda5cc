"""Load test of `subjectforge serve` (pipeline/serving/app.py) on one GPU, over HTTP on loopback.

Images/s and per-request latency with 1, 4 and 16 concurrent clients, each sending requests of
one image one after another, in three workloads: every request on one LoRA subject; requests
spread over 100 LoRA subjects (each a named adapter of the one base UNet); zero-shot requests
carrying 3 reference photos. The base has the released sizes and random weights
(bench_generate.build_real), saved to a temporary folder; the LoRA subjects have random
weights, logged once and registered under 100 names in a SQLite MLflow store. 50 steps, 512 px,
guidance 7.5. Each workload is warmed up first (every subject loaded, with 1-step requests).
The JSON also holds the replica's torch.compile graph count (/healthz `compiled_graphs`) after
its start and after each workload: flat with `--compile` when the replica's warm-up covered
every variant; its count of graphs compiled without CUDA graphs (`cudagraph_skips`, with
Inductor's reasons) and its resolved `compile_mode`. Each run holds the mean phases of its
answers (`phases_s`: the answers' `timings`, pipeline/serving/timings.py) and
`outside_replica_s`, the clients' mean latency minus the replica's mean total (Serve's proxy,
HTTP, the answer's JSON): where a request's time goes, and `gpu_busy`, nvidia-smi's utilisation
sampled through the run (machine.GpuBusy): whether the GPU or the host was the limit. Runs are written as they end
(`"partial": true` until the summary).

    python benchmarks/bench_serve.py --compile --out bench_serve.json   # the GPU machine
    python benchmarks/bench_serve.py --smoke --out /tmp/bench_serve.json  # CPU, tiny profile

Targets (issue 22): at least 4 images/s at 16 clients on one subject; p50 at most 0.6 s at 1
client, compiled; 100 subjects at most 5% below one subject's throughput; zero-shot at most
10% slower than a registered subject.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import GpuBusy, describe  # noqa: E402

log = logging.getLogger("bench_serve")
PROMPT = "on the beach"


def healthz(url: str) -> dict:
    """The replica's GET /healthz answer."""
    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as answer:
        return json.loads(answer.read())


def replica_state(url: str) -> dict:
    """The replica's compile state from /healthz: torch.compile graphs, the resolved mode, the
    graphs compiled without CUDA graphs with Inductor's reasons, and serve.compile_cache's folder
    with the cache hits and misses of its compiles."""
    health = healthz(url)
    keys = ("compiled_graphs", "compile_mode", "cudagraph_skips", "cudagraph_skip_reasons", "compile_cache")
    return {key: health.get(key) for key in keys}


def compile_record(states: dict[str, dict]) -> dict:
    """The JSON's compile keys from replica_state after the start and each workload:
    compiled_graphs and cudagraph_skips at each, the mode and the last skip reasons."""
    last = list(states.values())[-1]
    return {
        "compile_mode": last["compile_mode"],
        "compiled_graphs": {when: state["compiled_graphs"] for when, state in states.items()},
        "cudagraph_skips": {when: state["cudagraph_skips"] for when, state in states.items()},
        "cudagraph_skip_reasons": last["cudagraph_skip_reasons"],
        # What the warm-up's compiles found in serve.compile_cache (hits: a warm start).
        "compile_cache": list(states.values())[0]["compile_cache"],
    }


def build_base(folder: Path, smoke: bool) -> str:
    """The served base model's folder: the tiny checkpoint, or real sizes with random weights."""
    from pipeline.config import PROFILE_MODELS

    if smoke:
        return PROFILE_MODELS["tiny"]["blip_diffusion"]
    from bench_generate import build_real

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = build_real(device, torch.float16 if device.type == "cuda" else torch.float32)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return str(folder)


def register_loras(uri: str, base: str, folder: Path, count: int, size: int) -> list[str]:
    """`count` registered LoRA subjects (one random-weight artifact under `count` names), @bench."""
    from mlflow import MlflowClient

    from pipeline import tracking
    from pipeline.model import BlipDiffusion
    from pipeline.model.subject import SubjectSpec, add_lora, save_subject

    model = BlipDiffusion.from_pretrained(base)
    embeds = model.encode_subject(Image.new("RGB", (224, 224), "brown"), "dog")
    add_lora(model.unet, 4, 4.0)
    for name, param in model.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn_like(param) * 0.01
    save_subject(folder / "lora", SubjectSpec("lora", "bench", "dog", base, size, lora_rank=4, lora_alpha=4.0), model, embeds)
    tracking.ensure_experiment(uri, "bench-serve", (folder / "artifacts").as_uri())
    run_id = tracking.start_run(uri, "bench-serve", "bench-lora")
    names = [f"bench-lora-{i:03d}" for i in range(count)]
    tracking.log_subject_model(uri, run_id, folder / "lora", names[0], {}, "bench")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    source = client.get_model_version(names[0], "1").source
    for name in names[1:]:  # the same files under other names: each is its own adapter to the server
        client.create_registered_model(name)
        client.create_model_version(name, source=source, run_id=run_id)
        client.set_registered_model_alias(name, "bench", "1")
    tracking.finish_run(uri, run_id)
    return names


def post(url: str, payload: dict, timeout: float = 600) -> tuple[int, float, dict | None]:
    """(HTTP status, seconds, the answer's phase `timings` or None) of one POST /v1/generate."""
    start = time.perf_counter()
    request = urllib.request.Request(f"{url}/v1/generate", json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        return exc.code, time.perf_counter() - start, None
    seconds = time.perf_counter() - start  # the answer's JSON is parsed after the clock stops
    return status, seconds, json.loads(body).get("timings")


def mean_phases(timings: list[dict]) -> dict[str, float]:
    """Mean seconds of each phase (and the total) over the answers' `timings`."""
    if not timings:
        return {}
    return {name: round(statistics.fmean(t[name] for t in timings), 4) for name in timings[0]}


def batch_totals(url: str) -> tuple[int, int]:
    """(batches, images) the replica drew since it started (/healthz `batch_means`)."""
    means = healthz(url)["batch_means"]
    return means["batches"], means.get("images_drawn", 0)


def run_load(url: str, payloads: list[dict], clients: int, per_client: int) -> dict:
    """`clients` threads, each sending `per_client` requests in turn; payloads are used round-robin.
    With the replica's mean images per batch over the run (all requests of one image: a batch of
    n images took n callers' requests together)."""
    batches_before, images_before = batch_totals(url)
    counter = iter(range(clients * per_client))
    lock = threading.Lock()

    def client(_):
        out = []
        for _ in range(per_client):
            with lock:
                i = next(counter)
            out.append(post(url, payloads[i % len(payloads)]))
        return out

    start = time.perf_counter()
    with GpuBusy() as busy, ThreadPoolExecutor(clients) as pool:
        results = [r for part in pool.map(client, range(clients)) for r in part]
    wall = time.perf_counter() - start
    batches_after, images_after = batch_totals(url)
    batches = batches_after - batches_before
    latencies = sorted(s for _, s, _ in results)
    errors = sum(1 for status, _, _ in results if status != 200)
    phases = mean_phases([t for status, _, t in results if status == 200 and t])
    answered = [s for status, s, t in results if status == 200 and t]
    return {
        "clients": clients, "requests": len(results), "errors": errors, "seconds": round(wall, 3),
        "images_per_s": round((len(results) - errors) / wall, 3),
        "p50_s": round(statistics.median(latencies), 4), "p90_s": round(float(np.percentile(latencies, 90)), 4),
        "mean_s": round(statistics.fmean(latencies), 4),
        # The replica's mean phases of these answers, and what the clients waited beyond its total.
        "phases_s": phases,
        "outside_replica_s": round(statistics.fmean(answered) - phases["total"], 4) if phases else None,
        "batches": batches, "images_per_batch": round((images_after - images_before) / batches, 2) if batches else None,
        "gpu_busy": busy.result,  # near 100%: the GPU is the limit; lower: the replica's host side is
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny profile, 2 steps, 64 px, few clients (CPU)")
    parser.add_argument("--compile", action="store_true", help="serve.compile (warm-up before the replica is ready)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--per-client", type=int, default=8, help="requests each client sends")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--workloads", default="one-subject,many-subjects,zero-shot-3-photos",
                        help="which workloads to run, comma-separated (a short GPU lease runs the ones it measures)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the replica, after the bench's own (e.g. serve.compile_mode=max-autotune)")
    parser.add_argument("--out", type=Path, default=Path("bench_serve.json"))
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.size, args.clients, args.subjects, args.per_client = 2, 64, "1,2", 3, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    clients = [int(c) for c in args.clients.split(",")]

    import ray
    from ray import serve

    from pipeline.config import load_config
    from pipeline.serving.app import APP_NAME, build_app

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base = build_base(root / "base", args.smoke)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        names = register_loras(uri, base, root, args.subjects, args.size)
        setup_s = time.perf_counter() - t0
        log.info("base and %d subjects ready in %.0f s", len(names), setup_s)
        config = load_config(overrides=[
            f"models.blip_diffusion={base}", f"tracking.uri={uri}", f"serve.compile={args.compile}", f"serve.port={args.port}",
            f"serve.max_batch_size={max(clients)}", f"serve.max_batch_images={max(clients)}",
            f"generate.height={args.size}", f"generate.width={args.size}", f"serve.max_lora_adapters={max(args.subjects, 1)}",
            *args.overrides,
        ])
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port, "request_timeout_s": 600})
        t0 = time.perf_counter()
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        start_s = time.perf_counter() - t0
        url = f"http://127.0.0.1:{args.port}"
        common = {"prompt": PROMPT, "steps": args.steps, "guidance_scale": 7.5, "height": args.size, "width": args.size}
        rng = np.random.default_rng(0)
        photos = []
        for _ in range(3):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (400, 300, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            photos.append(base64.b64encode(buffer.getvalue()).decode())
        workloads = {
            "one-subject": [{**common, "subject": f"models:/{names[0]}@bench", "seed": i} for i in range(16)],
            f"{len(names)}-subjects": [{**common, "subject": f"models:/{n}@bench", "seed": i} for i, n in enumerate(names)],
            "zero-shot-3-photos": [{**common, "reference_images": photos, "category": "dog", "seed": i} for i in range(16)],
        }
        chosen = args.workloads.replace("many-subjects", f"{len(names)}-subjects").split(",")
        workloads = {name: payloads for name, payloads in workloads.items() if name in chosen}
        runs, states = [], {"after_start": replica_state(url)}
        for workload, payloads in workloads.items():
            for payload in payloads:  # load every subject before timing
                assert post(url, {**payload, "steps": 1})[0] == 200
            for n in clients:
                run_load(url, payloads[:n], n, 1)  # warm-up at this batch size
                result = {"workload": workload, **run_load(url, payloads, n, args.per_client)}
                log.info("%s", result)
                runs.append(result)
                # Each run as it ends: a run cut short (a device lease, a crash) keeps the ones before.
                args.out.write_text(json.dumps({"serve_start_s": round(start_s, 1), "runs": runs, **compile_record(states), "partial": True},
                                              indent=2) + "\n")
            states[f"after_{workload}"] = replica_state(url)
        serve.shutdown()
        ray.shutdown()

    def at(workload: str, n: int, key: str) -> float | None:
        """A run's figure, None when that workload was not run."""
        return next((r[key] for r in runs if r["workload"] == workload and r["clients"] == n), None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a / b, 3)

    top = max(clients)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe("ray", "diffusers", "peft"),
        "settings": {"steps": args.steps, "size": args.size, "guidance_scale": 7.5, "compile": args.compile,
                     "subjects": len(names), "per_client": args.per_client, "smoke": args.smoke, "overrides": args.overrides},
        "setup_s": round(setup_s, 1), "serve_start_s": round(start_s, 1),
        # The replica's torch.compile graphs after its warm-up and after each workload: with
        # serve.compile they stay flat, or requests compiled (the warm-up missed a variant). Beside
        # them, graphs left without CUDA graphs (reduce-overhead) and Inductor's reasons.
        **compile_record(states),
        "runs": runs,
        "summary": {
            f"images_per_s_one_subject_{top}_clients": at("one-subject", top, "images_per_s"),
            "p50_s_one_subject_1_client": at("one-subject", min(clients), "p50_s"),
            "many_subjects_throughput_vs_one": ratio(at(f"{len(names)}-subjects", top, "images_per_s"),
                                                     at("one-subject", top, "images_per_s")),
            "zero_shot_p50_vs_registered_1_client": ratio(at("zero-shot-3-photos", min(clients), "p50_s"),
                                                          at("one-subject", min(clients), "p50_s")),
            # Where the time of those two targets went (seconds per phase, pipeline/serving/timings.py).
            "phases_s_one_subject_1_client": at("one-subject", min(clients), "phases_s"),
            f"phases_s_one_subject_{top}_clients": at("one-subject", top, "phases_s"),
            "cudagraph_skips": list(states.values())[-1]["cudagraph_skips"],
        },
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
