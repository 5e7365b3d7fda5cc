"""Identities from the schema: every config field is either marked Runtime or Input in
pipeline/config.py or counts in the identities (the data build's processing digest, the
fine-tune key), so a new setting changes them unless someone decided it should not."""

from pathlib import Path

from pydantic import BaseModel, Field

from pipeline.config import Config, DataConfig, DecodeConfig, TrainConfig, field_identity, load_config
from pipeline.data.build import processing_digest
from pipeline.train.finetune import finetune_key

# Every field's decision. A field added to a config model fails test_every_field_has_a_decision
# until it is listed here: under IDENTITY if it may change what its command produces (the
# default), else marked Runtime or Input in pipeline/config.py and listed under that.
IDENTITY = """
    data.decode.size data.decode.min_side data.decode.max_pixels data.decode.max_bytes data.decode.max_aspect
    data.segment.prompt_template data.segment.normalize data.trimap.high data.trimap.low data.trimap.erode_fg_px
    data.trimap.erode_bg_px data.matte.backend data.matte.tol data.filter.min_area data.filter.max_area
    data.composite.per_photo data.composite.scale_min data.composite.scale_max data.composite.seed
    data.write.image_format data.write.jpeg_quality generate.steps generate.guidance_scale generate.negative_prompt
    generate.height generate.width generate.seed generate.dtype generate.control.kind generate.control.scale
    generate.control.start generate.control.end generate.control.canny_low generate.control.canny_high serve.dtype evaluate.images_per_prompt
    evaluate.thumbnail evaluate.control train.method train.workers train.steps train.batch_size train.grad_accum train.lr
    train.weight_decay train.warmup_steps train.max_grad_norm train.resolution train.crop train.composite train.prompt_template
    train.drop_subject_prob train.trainable.qformer train.trainable.projection train.trainable.text_encoder
    train.trainable.unet train.precompute train.mixed_precision train.shuffle_buffer train.seed finetune.method
    finetune.subject_id finetune.steps finetune.batch_size finetune.lr finetune.weight_decay finetune.init_from finetune.init_photos finetune.validate_every finetune.validation_prompts finetune.validation_steps finetune.select finetune.patience
    finetune.train_text_encoder finetune.lora_rank finetune.lora_alpha finetune.identifier finetune.prior_images
    finetune.prior_weight finetune.prior_steps train.optimizer train.ema_decay train.snr_gamma train.noise_offset
    finetune.ti_vectors finetune.ti_property
    data.filter.exclude_prompts data.filter.exclude_area data.caption.enabled data.caption.prompt
    data.caption.max_new_tokens data.caption.num_beams train.lr_scaling train.reference_batch
    edit.cross_replace_steps edit.self_replace_steps edit.threshold edit.mask_threshold edit.keep_outside
"""
RUNTIME = """
    data.max_reject_fraction data.keep_failed data.segment.batch_size data.segment.num_actors data.segment.num_gpus
    data.matte.concurrency data.matte.num_gpus data.matte.num_actors data.matte.batch_size data.write.rows_per_file
    ray.address ray.num_cpus serve.limits.max_num_images serve.limits.max_steps serve.limits.max_size
    serve.limits.max_prompt_chars serve.limits.max_seed serve.limits.max_guidance_scale serve.limits.max_request_pixels
    serve.host serve.port
    serve.num_replicas serve.num_gpus serve.max_batch_size serve.batch_wait_timeout_s serve.max_batch_images
    serve.max_queued_requests serve.request_timeout_s serve.max_request_mb serve.max_reference_images
    serve.max_subjects serve.max_lora_adapters serve.max_lora_rank serve.lora_merge serve.full_unet_budget_gb serve.compile serve.compile_mode serve.warmup_steps serve.compile_cache
    evaluate.out evaluate.num_actors evaluate.num_gpus evaluate.batch_size evaluate.score_batch_size train.run_name
    train.storage_path train.gpu train.cpus_per_worker train.compile train.compile_mode train.cuda_graphs
    train.sdpa_backend train.unet_sdpa_backend train.data_cpus train.checkpoint_every train.keep_checkpoints
    train.max_failures train.log_every train.samples.every train.samples.subjects train.samples.prompt
    train.samples.steps train.samples.guidance_scale train.register_as train.step_log train.fail_at_step
    train.gradient_checkpointing
    finetune.out finetune.register_model finetune.register_prefix finetune.alias finetune.num_gpus
    finetune.concurrency finetune.max_retries tracking.enabled tracking.uri tracking.experiment
    tracking.data_experiment tracking.system_metrics submit.max_upload_mb
    data.caption.batch_size data.caption.num_actors data.caption.num_gpus data.caption.attention
"""
INPUT = """
    profile models.clipseg models.blip_diffusion models.dino models.clip data.backgrounds.folder data.backgrounds.reject_prompts
    data.backgrounds.reject_threshold data.backgrounds.reject_area data.source.follow_links data.duplicates
    generate.control.image generate.control.controlnet generate.control.detector evaluate.model evaluate.photos evaluate.benchmark evaluate.prompts evaluate.subjects evaluate.qformer_tokenizer
    train.data finetune.base finetune.subject finetune.category finetune.subjects finetune.affected_only
    models.captioner
"""


def _fields(model: type[BaseModel], prefix: str = ""):
    """(dotted path, decision) of every leaf field under `model`."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field_identity(field)


def test_every_field_has_a_decision():
    listed = {path: kind for kind, text in (("identity", IDENTITY), ("runtime", RUNTIME), ("input", INPUT)) for path in text.split()}
    schema = dict(_fields(Config))
    undecided = sorted(set(schema) - set(listed))
    assert not undecided, f"new config fields {undecided}: list each in {__file__} (and mark Runtime or Input if it changes no output)"
    assert not set(listed) - set(schema), f"listed fields the config no longer has: {sorted(set(listed) - set(schema))}"
    assert schema == listed, {path: (schema[path], listed[path]) for path in schema if schema[path] != listed[path]}


# Digests of the settings before they were derived from the schema (computed with the code of
# 07cfdd3): an upgrade must not reprocess every existing dataset or retrain every registered
# subject. The processing digests changed once since, on purpose, when the build gained captions
# and the people filter (data.caption.*, data.filter.exclude_*): datasets without captions are
# built again. CLIPSeg and the captioner are pinned to one path, as a user's models.* setting
# names them (the tiny profile's bundled ones count by their place in the package). The fine-tune keys are those since the photo initialisation
# and validation settings (finetune.init_from to finetune.patience), which change what a
# fine-tune registers.
_DIGESTS = {
    "real": ("6392d183c5e7c12cf8b1d01d022415ef490cfdd9ae99dad8ad83e85f8e7bd0bc", "49fef38857dc1355"),
    "tiny": ("d4b2215abd0ddb311fc5253a44d01a46bd88ed0c22f427b1522a9012bb215958", "3f92ff87b203f438"),
}


def test_digests_of_the_default_configs_are_unchanged():
    for profile, (processing, key) in _DIGESTS.items():
        config = load_config(overrides=[f"profile={profile}", "models.clipseg=/models/clipseg", "models.captioner=/models/captioner"])
        assert processing_digest(config, "bghash") == processing, profile
        assert finetune_key(config, "dog", "abc123", "base") == key, profile


def test_the_bundled_tiny_models_count_by_their_place_in_the_package(monkeypatch, tmp_path):
    """A submitted job runs from an uploaded copy of the checkout, so the tiny profile's models sit
    under another folder there: that alone must not make the next refresh reprocess everything."""
    import pipeline.config as config_module

    here = processing_digest(load_config(overrides=["profile=tiny"]), "bg")
    moved = tmp_path / "job-upload" / "pipeline" / "assets"
    tiny = {name: str(moved / Path(path).name) for name, path in config_module.PROFILE_MODELS["tiny"].items()}
    monkeypatch.setattr(config_module, "ASSETS_DIR", moved)
    monkeypatch.setitem(config_module.PROFILE_MODELS, "tiny", tiny)
    assert processing_digest(load_config(overrides=["profile=tiny"]), "bg") == here


def test_runtime_settings_leave_the_digests_alone():
    base = load_config(overrides=["profile=tiny"])
    runtime = load_config(overrides=["profile=tiny", "data.matte.num_actors=2", "data.segment.batch_size=4", "data.keep_failed=3",
                                     "data.write.rows_per_file=7", "data.source.follow_links=true", "data.duplicates=keep", "train.gpu=true",
                                     "train.log_every=3", "finetune.alias=x", "tracking.enabled=false"])
    assert processing_digest(runtime, "bg") == processing_digest(base, "bg")
    assert finetune_key(runtime, "dog", "d", "b") == finetune_key(base, "dog", "d", "b")


class _Decode(DecodeConfig):
    sharpen: float = Field(0.0, description="a setting added later, with no decision about identities")


class _Data(DataConfig):
    decode: _Decode = _Decode()


class _Train(TrainConfig):
    caption_dropout: float = Field(0.0, description="a weight-changing setting added later")


class _Config(Config):
    data: _Data = _Data()
    train: _Train = _Train()


def test_a_new_field_changes_the_digests_by_default():
    def config(sharpen=0.0, caption_dropout=0.0):
        return _Config(profile="tiny", data=_Data(decode=_Decode(sharpen=sharpen)), train=_Train(caption_dropout=caption_dropout))

    assert processing_digest(config(sharpen=0.5), "bg") != processing_digest(config(), "bg")
    assert finetune_key(config(caption_dropout=0.1), "dog", "d", "b") != finetune_key(config(), "dog", "d", "b")


def test_weight_changing_train_settings_change_the_finetune_key():
    def key(*overrides):
        return finetune_key(load_config(overrides=["profile=tiny", *overrides]), "dog", "d", "b")

    changed = [key("train.max_grad_norm=0.5"), key("train.trainable.unet=false"), key("train.mixed_precision=bf16"),
               key("train.seed=1"), key("train.crop=center")]
    assert len({key(), *changed}) == 1 + len(changed)
    # train.* values a fine-tune's recipe sets from finetune.* count through finetune.*.
    assert key("train.lr=0.5") == key() != key("finetune.lr=0.5")


def test_memory_and_quality_settings_change_the_finetune_key_unless_they_change_no_weight():
    def key(*overrides):
        return finetune_key(load_config(overrides=["profile=tiny", *overrides]), "dog", "d", "b")

    changed = [key("train.optimizer=adamw8bit"), key("train.ema_decay=0.999"), key("train.snr_gamma=5"),
               key("train.noise_offset=0.05"), key("finetune.ti_vectors=2"), key("finetune.ti_property=style")]
    assert len({key(), *changed}) == 1 + len(changed)
    # Same loss and gradients (tests/train/test_memory.py): a checkpointed fine-tune is the same fine-tune.
    assert key("train.gradient_checkpointing=true") == key()
