"""`subjectforge serve`: a Ray Serve application drawing zero-shot and registered subjects.

One deployment, SubjectServer; each replica (one per GPU) holds the base model once and
answers HTTP itself, with no web framework:

| route              | answer                                                           |
| ------------------ | ---------------------------------------------------------------- |
| POST /v1/generate  | base64 PNGs, the seed, the subject's version and phase timings   |
| GET /v1/subjects   | registered subjects (finetune.register_prefix) and their aliases |
| GET /healthz       | base model, device, memory, compile state, mean phase timings    |
| GET /, /app.js     | the page for people (static/)                                    |

A request is checked (api.py), its subject resolved and fetched (subjects.py) on the event
loop's worker threads; then it joins the batch queue (batcher.py: every request waiting when the
model is free, up to serve.max_batch_size) and the Engine draws the batch on the replica's one
compute thread, so no two batches touch the model at once. Each
answer says where its time went (serving/timings.py): `timings` in the JSON and a
Server-Timing header.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from pipeline.config import Config, load_config
from pipeline.serving.api import (
    MIX,
    ZERO_SHOT,
    ApiError,
    GenerateCall,
    check_content_type,
    image_answer,
    json_items_limit,
    parse_generate,
    read_json,
)
from pipeline.serving.batcher import BatchQueue
from pipeline.serving.drawn import finish_jobs
from pipeline.serving.engine import Engine, Job, is_device_failure, is_out_of_memory
from pipeline.serving.metrics import ServeMetrics
from pipeline.serving.requests import RequestError
from pipeline.serving.slots import match_slots
from pipeline.serving.subjects import (
    MixedSubject,
    RegistryUnavailable,
    SubjectLibrary,
    SubjectNotFound,
    SubjectRef,
    SubjectUnusable,
    without_passwords,
)
from pipeline.serving.timings import TOTAL, CudagraphSkips, cudagraph_skips, rounded, server_timing
from pipeline.serving.warmup import hold_compiled_graphs, warm_up

log = logging.getLogger(__name__)

APP_NAME = "subjectforge"
STATIC = Path(__file__).parent / "static"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8")}
GENERATE = "/v1/generate"  # POST; the other routes take GET (and HEAD)
ROUTES = (GENERATE, "/healthz", "/v1/subjects", *PAGES)
UNREGISTERED = "unregistered"  # the metrics' subject of requests for a name the registry does not hold


def compile_mode_for(device: str, setting: str) -> str | None:
    """The torch.compile mode of `serve.compile_mode` on a device type ("cuda", "cpu").

    auto = reduce-overhead on CUDA: the compiled graphs replay as CUDA graphs (on an H100,
    0.43 s/image against 0.65 without them, and no minutes of autotuning per graph variant at
    start). On a CPU, Inductor's default (None): its autotuned GEMM templates fail on the LoRA
    slots' per-row batched matmul (torch 2.13: IndexError in cpp_bmm_template) and rarely beat
    the default there. An explicit setting is used as it is.
    """
    if setting != "auto":
        return setting
    return "reduce-overhead" if device == "cuda" else None


class SubjectServer:
    """One replica: the base model, its subjects and the batch queue."""

    # The first device failure a batch met (engine.is_device_failure); check_health reports it.
    device_failure: str | None = None

    def __init__(self, config: Config) -> None:
        import torch

        from pipeline import tracking
        from pipeline.model import BlipDiffusion

        self.config = config
        cfg = config.serve
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = cfg.dtype if cfg.dtype != "auto" else ("float16" if self.device.type == "cuda" else "float32")
        self.uri = tracking.resolve_tracking_uri(config.tracking.uri)
        self.base = config.model_path("blip_diffusion")
        path = str(tracking.download_model(self.uri, self.base)) if self.base.startswith("models:/") else self.base
        model = BlipDiffusion.from_pretrained(path, dtype=getattr(torch, dtype), device=self.device)
        self.engine = Engine(model, cfg.max_batch_images, cfg.max_subjects, cfg.max_lora_adapters, serve_controlnet(config), config.edit,
                             cfg.max_lora_rank, cfg.lora_merge)
        mode = compile_mode_for(self.device.type, cfg.compile_mode)
        self.compile_mode = (mode or "default") if cfg.compile else "off"  # the resolved mode, for /healthz
        self.skip_log = CudagraphSkips.install() if cfg.compile else None  # before any graph is compiled
        self.compile_cache = None
        if cfg.compile:  # after the Engine put its LoRA slots in the UNet: they are part of its graph
            if cfg.compile_cache:  # a volume: a restarted or new replica reuses the generated code
                from pipeline.train.speed import point_compile_cache

                self.compile_cache = point_compile_cache(cfg.compile_cache)
            model.compile_for_inference(mode=mode)
        self.library = SubjectLibrary(self.uri, cfg.max_subjects, cfg.full_unet_budget_gb * 1e9)
        self.metrics = ServeMetrics()
        self.pages = {route: ((STATIC / name).read_bytes(), kind) for route, (name, kind) in PAGES.items()}
        # Every generation runs on this one thread (the batch queue's draws, and the warm-up); a
        # drawn batch's images come to the host on the other, while the next batch draws (drawn.py).
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="subjectforge-compute")
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="subjectforge-finish")
        self.batches = BatchQueue(self.engine.draw, self._compute, cfg.max_batch_size, cfg.batch_wait_timeout_s,
                                  on_batch=self.metrics.record_batch, finish=finish_jobs, finisher=self._finisher)
        if cfg.compile or self.device.type == "cuda":
            # On the compute thread, not this one: torch's CUDA graph trees are per thread, so
            # graphs recorded (reduce-overhead) on another thread would be recorded again on the
            # first request.
            self._compute.submit(warm_up, self.engine, config).result()
        if cfg.compile:
            hold_compiled_graphs()
        log.info("serving %s on %s (%s)", self.base, self.device, dtype)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        try:
            if path not in ROUTES:  # before the method: a POST to a mistyped path was told the path takes GET
                raise ApiError(404, "path", f"no page {path[:100]}; the routes are {', '.join(ROUTES)}")
            if path == GENERATE:
                if request.method != "POST":
                    raise ApiError(405, "method", f"{path} takes POST")
                return await self._generate(request)
            if request.method not in ("GET", "HEAD"):
                raise ApiError(405, "method", f"{path} takes GET")
            if path == "/healthz":  # 503 after a device failure, as check_health fails then
                return JSONResponse(self._health(), status_code=200 if self.device_failure is None else 503)
            if path == "/v1/subjects":
                return JSONResponse(await self._subjects())
            body, kind = self.pages[path]
            return Response(body, media_type=kind)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)

    async def _generate(self, request: Request) -> Response:
        subject_name, arrived = "invalid", time.monotonic()
        try:
            body = await _read_body(request, int(self.config.serve.max_request_mb * 2**20))
            check_content_type(request.headers.get("content-type"))
            call = await asyncio.to_thread(self._parse, body)
            r, version = call.request, None
            if isinstance(call.subject, SubjectRef):
                subject_name = call.subject.name
                try:
                    subject, version = await asyncio.to_thread(self._registered, call.subject)
                except ApiError as exc:
                    if exc.status == 404:  # a name a client made up is no metrics series of its own (ServeMetrics)
                        subject_name = UNREGISTERED
                    raise
                size = subject.spec.resolution
            elif isinstance(call.subject, MixedSubject):
                subject_name, size = MIX, None
                subject, version = await asyncio.to_thread(self._mixed, call.subject)
            else:
                subject_name, subject = ZERO_SHOT, call.subject
                size = None
            if call.control is not None and self.engine.controlnet_path is None:
                raise ApiError(422, "control_image", "this server has no ControlNet: set generate.control.controlnet")
            gen = self.config.generate
            job = Job(r, subject, r.height or size or gen.height, r.width or size or gen.width, control=call.control, edit=call.edit,
                      slots=_slotted(call, subject))
            await self.batches.submit(job)
            if job.error is not None:
                if is_device_failure(job.error) and self.device_failure is None:
                    self.device_failure = f"{type(job.error).__name__}: {str(job.error)[:300]}"
                    log.error("the device failed (%s): the health check fails from now on, so Serve replaces this replica",
                              self.device_failure)
                raise _api_error(job.error)
            encoding = time.monotonic()
            # PNG encoding holds a core for ~20-50 ms an image at 512 px: on the event loop it would
            # stall every other request (new ones joining the next batch included).
            answer = await self._encode(job, subject_name, version)
            done = time.monotonic()
            timings = {"prepare": job.enqueued - arrived, **job.timings, "encode": done - encoding, TOTAL: done - arrived}
            self.metrics.record_job(subject_name, timings, r.num_images)
            answer["timings"] = rounded(timings)
        except Exception as exc:  # an ApiError, or memory run out before the batch (decoding photos, loading a subject)
            if not isinstance(exc, ApiError):
                if not is_out_of_memory(exc):
                    raise
                exc = _api_error(exc)  # a 503; the replica goes on
            self.metrics.record_request(subject_name, exc.status)
            return JSONResponse(exc.body(), status_code=exc.status)
        self.metrics.record_request(subject_name, 200)
        return JSONResponse(answer, headers={"Server-Timing": server_timing(timings)})

    async def _encode(self, job: Job, subject_name: str, version: str | None) -> dict[str, Any]:
        """The answer of a drawn job, its PNGs encoded on a worker thread. A failure there is the
        job's own, after its batch was finished (drawn.py): answered as a failed draw is (a 500
        naming the request, or a 503 for memory), never an exception for Serve to answer."""
        try:
            return await asyncio.to_thread(image_answer, job.images, job.request, subject_name, version, self.base)
        except Exception as exc:
            raise _api_error(exc) from exc

    def _parse(self, body: bytes) -> GenerateCall:
        """The checked call of a POST /v1/generate body (api.py), on a worker thread: json.loads of
        a body of serve.max_request_mb takes about a second, which on the event loop would stall
        every other request."""
        return parse_generate(read_json(body, len(body), json_items_limit(self.config.serve.limits)), self.config)

    def _registered(self, ref: SubjectRef) -> tuple[Any, str]:
        """The subject `ref` names, at the version its alias points at now (read once)."""
        try:
            version = self.library.resolve(ref)
            subject = self.library.load(ref.name, version)
        except SubjectNotFound as exc:
            raise ApiError(404, "subject", str(exc)) from None
        except SubjectUnusable as exc:
            raise ApiError(422, "subject", str(exc)) from None
        except RegistryUnavailable as exc:
            raise ApiError(503, "registry", str(exc)) from None
        log.info("%s: version %s", ref.uri, version)
        return subject, version

    def _mixed(self, mix: MixedSubject) -> tuple[MixedSubject, str | None]:
        """`mix` with its registered parts resolved and fetched, and their "NAME/VERSION"s. Each
        takes part by its embeddings (a subject without them, dreambooth or a textual-inversion word, is a 422)."""
        parts, versions = [], []
        for i, part in enumerate(mix.parts):
            if isinstance(part, SubjectRef):
                try:
                    part, version = self._registered(part)
                except ApiError as exc:
                    if exc.field != "subject":  # the registry's own failure (503)
                        raise
                    raise ApiError(exc.status, f"mix[{i}].subject", exc.message) from None
                if part.embeds is None or part.spec.ti_property is not None:  # dreambooth; textual inversion's word [S]
                    raise ApiError(422, f"mix[{i}].subject", f"models:/{part.key} is a {part.spec.method} subject: it has no subject embeddings to mix")
                versions.append(part.key)
            parts.append(part)
        return MixedSubject(tuple(parts), mix.weights), ",".join(versions) or None

    async def _subjects(self) -> dict[str, Any]:
        from pipeline import tracking

        try:
            found = await asyncio.to_thread(tracking.registered_models, self.uri, self.config.finetune.register_prefix)
        except Exception as exc:  # the registry is down: say so, keep serving
            raise ApiError(503, "registry", f"the registry at {self.uri} did not answer: {without_passwords(str(exc))[:300]}") from None
        return {"subjects": found, "adapters_loaded": len(self.engine.adapters)}

    def check_health(self) -> None:
        """Ray Serve's periodic replica check: raises after a device failure, whose CUDA context
        would fail every later request, so that Serve replaces the replica (out of memory does
        not count: the next batch survives it)."""
        if self.device_failure is not None:
            raise RuntimeError(f"the device failed: {self.device_failure}")

    def _health(self) -> dict[str, Any]:
        import psutil
        from torch._dynamo.utils import counters

        from pipeline.train.speed import compile_cache_counts

        return {
            "status": "ok" if self.device_failure is None else f"device failed: {self.device_failure}", "base_model": self.base, "device": str(self.device), "dtype": str(self.engine.model.dtype),
            "pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss, "adapters_loaded": len(self.engine.adapters),
            # Graphs torch.compile made in this process (serve.compile): flat after the warm-up, or
            # requests are compiling (minutes each on a GPU) and may pass Dynamo's recompile limit.
            "compiled_graphs": counters["stats"]["unique_graphs"],
            "compile_mode": self.compile_mode,
            # Graphs compiled without CUDA graphs (reduce-overhead): each replays kernel by kernel.
            "cudagraph_skips": cudagraph_skips(),
            "cudagraph_skip_reasons": self.skip_log.reasons if self.skip_log is not None else [],
            # serve.compile_cache, and what this replica's compiles found in the caches (hits: a warm start).
            "compile_cache": {"folder": self.compile_cache, **compile_cache_counts()},
            # Mean seconds per phase of the requests answered so far (serving/timings.py).
            "phase_means_s": self.metrics.phases.means(),
            # Batches drawn and their mean requests and images (serve.max_batch_size under load).
            "batch_means": self.metrics.batches.means(),
        }


def _slotted(call: Any, subject: Any) -> bool:
    """Whether the request's prompt names its (resolved) subjects in [slots]; ApiError 400 naming
    the field when a slot has no subject or a subject no slot (serving/slots.py), 422 for a
    subject without embeddings to put in one."""
    try:
        slots = match_slots(call.request.prompt, subject)
    except RequestError as exc:
        raise ApiError(400, exc.field, exc.message) from None
    except SubjectUnusable as exc:
        raise ApiError(422, "subject", str(exc)) from None
    if slots is not None and call.edit is not None:
        raise ApiError(400, "replace", "cannot be combined with [slot] prompts: an edit puts one subject in place of a word")
    return slots is not None


def _api_error(exc: BaseException) -> ApiError:
    """The answer to a request whose batch failed on the model."""
    from pipeline.model.editing import EditError
    from pipeline.model.prompts import PromptError

    if isinstance(exc, PromptError):  # a [slot] past the tokens the text encoder reads
        return ApiError(400, "prompt", str(exc))
    if isinstance(exc, EditError):  # a replaced word past the tokens left beside the subject's (found before any step)
        return ApiError(400, "replace", str(exc))
    if is_out_of_memory(exc):
        return ApiError(503, "request", "out of memory on the replica; retry, or ask for fewer or smaller images")
    if isinstance(exc, SubjectUnusable):
        return ApiError(422, "subject", str(exc))
    log.error("generation failed", exc_info=exc)
    return ApiError(500, "request", f"generation failed: {type(exc).__name__}")


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, kept no further than `max_bytes` (ApiError 413 beyond). The rest of a
    body that is too large is read and dropped, so the client, still sending, gets the 413
    rather than a connection cut under it; serve.request_timeout_s bounds how long that takes."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= max_bytes:
                chunks.append(chunk)
            else:
                chunks.clear()
    # Nobody reads this answer: it is counted, and no stack trace is logged for it. Under Ray
    # Serve a client that left reaches here as the proxy's cancelled receive (TaskCancelledError).
    except (ClientDisconnect, TaskCancelledError):
        raise ApiError(400, "request", f"the client left after {size} bytes of the body") from None
    if size > max_bytes:
        raise ApiError(413, "request", f"body of {size} bytes; at most {max_bytes} (serve.max_request_mb)")
    return b"".join(chunks)


def serve_controlnet(config: Config) -> str | None:
    """The ControlNet that draws requests with a control_image: generate.control.controlnet,
    else the profile's canny ControlNet (the served kinds, canny and map, are edge maps)."""
    from pipeline.config import PROFILE_CONTROLNETS

    return config.generate.control.controlnet or PROFILE_CONTROLNETS.get(config.profile, {}).get("canny")


def replica_gpus(config: Config) -> float:
    """serve.num_gpus, with auto = one GPU per replica when the Ray cluster has any."""
    import ray

    if config.serve.num_gpus != "auto":
        return float(config.serve.num_gpus)
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_app(config: Config) -> serve.Application:
    """The Serve application of `config` (serve.* places and sizes it)."""
    cfg = config.serve
    deployment = serve.deployment(
        SubjectServer,
        name="SubjectServer",
        num_replicas=cfg.num_replicas,
        ray_actor_options={"num_gpus": replica_gpus(config), "num_cpus": 1},
        # Enough requests in a replica to fill a batch while the previous one runs.
        max_ongoing_requests=2 * cfg.max_batch_size,
        max_queued_requests=cfg.max_queued_requests,
        health_check_period_s=10,
        health_check_timeout_s=60,
    )
    return deployment.bind(config)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application for a Serve config file or a RayService's serveConfigV2
    (import_path: pipeline.serving.app:app_builder); args: {config: FILE, set: [KEY=VALUE, ...]}."""
    return build_app(load_config(args.get("config"), list(args.get("set") or [])))
