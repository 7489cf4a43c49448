"""`ModelFamily`: everything that differs between model families, declared in one place per family.

The engine asks a job's family, never tests a family's name: which pipeline class runs each kind, what the
callbacks may read from the loop, how guidance works and how a CFG cutoff is made (or why it is refused), how
the loop's latents look and how a preview is made from them, which rows a shared call may drop, which samplers
apply, whether clip skip does, how the built-in tiny model is built and a real one loaded, and what a resume's
replay turns off. SD 1.5 and SDXL are `worker.models.families.sd`; adding a family is one module and its tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils.logging import disable_progress_bar

from producer.errors import ConfigError, ModelError, UnsupportedSpecError
from producer.prompt_syntax import Weighted
from producer.spec import CfgCutoff, RenderSpec, StepCache
from worker.models import single_file

Kind = str  # a spec's `pipeline`: text2img, img2img, inpaint, controlnet
PLAIN_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))
CLIP_TOKENS = 75  # a CLIP encoder's 77 positions less its start and end tokens


class ModelFamily:
    """The defaults of a family; each family overrides what differs."""

    name: ClassVar[str]
    pipelines: ClassVar[Mapping[Kind, Any]]  # the diffusers pipeline class of each kind the family runs
    denoiser: ClassVar[str] = "unet"  # the pipeline attribute of the model the loop calls each step
    tiny: ClassVar[Mapping[str, Callable[[], Any]]] = {}  # the built-in sources ("tiny", ...) and their builders
    load_options: ClassVar[Mapping[str, Any]] = {}  # extra `from_pretrained` arguments
    ip_adapter: ClassVar[bool] = False  # whether the family takes an IP-Adapter
    clip_skip: ClassVar[bool] = False  # whether its text encoders are CLIP layers that can be skipped
    step_caches: ClassVar[frozenset[str]] = frozenset()  # the `cache` types its model takes (diffusers' CacheMixin)
    cuda_dtype: ClassVar[str] = "float16"  # RENDER_DTYPE=auto on a GPU: SD's UNets run in float16
    true_cfg: ClassVar[bool] = False  # whether `true_cfg_scale` means anything to it (Flux.1's second, negative pass)
    # Whether it encodes `a1111` prompts itself (long prompts, prompt editing; weights and BREAK unless its
    # `check_prompts` refuses them); without, an `a1111` prompt with any syntax is refused.
    prompt_encoding: ClassVar[bool] = False
    prompt_schedule_inputs: ClassVar[tuple[str, ...]] = ()  # the loop's tensors a prompt schedule replaces
    # Why a guidance curve cannot apply to the family (None: its loop reads the guidance scale every step).
    guidance_curve: ClassVar[str | None] = "has no guidance scale its loop reads every step in this worker"
    # A curve's every step must stay above this scale, and why (SD's pipelines guide only above 1).
    guidance_floor: ClassVar[tuple[float, str]] = (1.0, "its pipeline stops guiding and changes its batch")
    latent_hires: ClassVar[bool] = False  # whether a hires pass may resize its loop's latents as they are
    refiner: ClassVar[bool] = False  # whether a refiner model may finish its text2img (SDXL's ensemble)

    # --- loading --------------------------------------------------------------------------------------------

    def build_tiny(self, source: str) -> Any:
        """The built-in tiny pipeline called `source`."""
        try:
            builder = self.tiny[source]
        except KeyError:
            raise ConfigError(
                f"RENDER_MODELS: {source!r} is not a built-in {self.name} model; use one of: {', '.join(self.tiny)}"
            ) from None
        return builder()

    def load(self, source: str, dtype: torch.dtype) -> Any:
        """A real checkpoint: `from_pretrained` on a local directory or a hub id in the cache, never the network."""
        disable_progress_bar()  # loading bars in a worker's log are noise; the load time is in the manifest
        try:
            with self.loading():
                return self.pipelines["text2img"].from_pretrained(
                    source, dtype=dtype, local_files_only=True, **self.load_options
                )
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"could not load {self.name} model from {source!r}: {exc}. "
                "Point RENDER_MODELS at a local diffusers directory or a hub id already in the local cache."
            ) from exc

    def load_file(self, file: str, base: str, dtype: torch.dtype) -> Any:
        """A single checkpoint file (`single_file.inspect` says what it holds) with `base` for configs and tokenizers:
        a whole checkpoint through the pipeline's `from_single_file`, a transformer or UNet alone (GGUF included)
        through the model's, the other components from `base`. Offline: `config=` is always the local `base`."""
        disable_progress_bar()
        facts = single_file.inspect(file)
        pipeline_class = self.pipelines["text2img"]
        with self.loading():
            if facts.holds == "pipeline":
                parts = self.whole_file_parts(facts, base, dtype)
                return pipeline_class.from_single_file(
                    file, config=base, torch_dtype=dtype, local_files_only=True, **parts, **self.load_options
                )
            model = single_file.load_denoiser(facts, base, self.denoiser, dtype)
            return pipeline_class.from_pretrained(
                base, dtype=dtype, local_files_only=True, **{self.denoiser: model}, **self.load_options
            )

    def whole_file_parts(self, facts: single_file.FileFacts, base: str, dtype: torch.dtype) -> dict[str, Any]:
        """Components of a whole checkpoint the family reads itself, where diffusers' loader would misread them."""
        return {}

    def whole_file_loader(self) -> bool:
        """Whether diffusers loads a whole checkpoint file of this family (a pipeline-level `from_single_file`)."""
        return hasattr(self.pipelines["text2img"], "from_single_file")

    def loading(self) -> contextlib.AbstractContextManager[None]:
        """Around every load: what the family's loader needs quietened or set."""
        return contextlib.nullcontext()

    def holds(self, pipeline_class: str) -> bool:
        """Whether a `model_index.json` naming `pipeline_class` is a model of this family."""
        return pipeline_class in {cls.__name__ for cls in self.pipelines.values()}

    def variant(self, base: Any, kind: Kind, extra: Mapping[str, Any]) -> Any:
        """`base` itself for text2img, else the `kind` pipeline sharing its components (`from_pipe`)."""
        if kind == "text2img":
            return base
        pipe = self.pipelines[kind].from_pipe(base, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    controlnet_class: ClassVar[Any] = None  # the ControlNet model class a `controlnet` entry loads
    control_image_argument: ClassVar[str] = "image"  # the pipeline argument that takes a ControlNet's image

    def tiny_controlnet(self, base: Any, seed: int = 0) -> Any:
        """A ControlNet shaped like `base`'s model, random weights from a fixed seed (for the tiny models)."""
        raise NotImplementedError

    def model(self, pipe: Any) -> Any:
        """The model the loop calls each step (the UNet or the transformer)."""
        return getattr(pipe, self.denoiser)

    # --- what a spec may ask of the family ---------------------------------------------------------------------

    def check(self, spec: RenderSpec, model: str) -> None:
        """Refuse what the family cannot run, naming the spec's field (before any model is loaded)."""
        if spec.pipeline not in self.pipelines:
            kinds = ", ".join(self.pipelines)
            raise UnsupportedSpecError(f"pipeline: {model!r} ({self.name}) runs {kinds}; got {spec.pipeline!r}")
        if spec.ip_adapter is not None and not self.ip_adapter:
            raise UnsupportedSpecError(f"ip_adapter: {model!r} ({self.name}) takes no IP-Adapter in this worker")
        if spec.true_cfg_scale != 1 and not self.true_cfg:
            raise UnsupportedSpecError(
                f"true_cfg_scale: {model!r} ({self.name}) guides with guidance_scale; leave true_cfg_scale at 1"
            )
        if spec.clip_skip and not self.clip_skip:
            raise UnsupportedSpecError(f"clip_skip: {model!r} ({self.name}) has no CLIP layers to skip; leave it 0")
        self.check_sampler(spec.scheduler, model)
        self.check_prompts(spec, model)
        self.check_stages(spec, model)
        if spec.cache is not None and spec.cache.type not in self.step_caches:
            offered = ", ".join(sorted(self.step_caches)) or "none"
            raise UnsupportedSpecError(
                f"cache.type: {model!r} ({self.name}) takes no {spec.cache.type!r} step cache in this worker "
                f"(it takes: {offered}); remove `cache`"
            )

    def check_sampler(self, name: str, model: str) -> None:
        """Refuse a sampler the family does not run."""

    def check_stages(self, spec: RenderSpec, model: str) -> None:
        """Refuse a second stage (`hires`, `refiner`) the family cannot run; the refiner model's own checks need
        the allowlist (`worker.engine.rendering.check_supported`)."""
        if spec.refiner is not None and not self.refiner:
            raise UnsupportedSpecError(
                f"refiner: {model!r} ({self.name}) takes no refiner; the base + refiner ensemble is SDXL's. "
                "Remove `refiner` or use an SDXL model"
            )
        if spec.hires is None:
            return
        if "img2img" not in self.pipelines:
            raise UnsupportedSpecError(f"hires: {model!r} ({self.name}) has no img2img pipeline; remove `hires`")
        if spec.hires.upscaler == "latent" and not self.latent_hires:
            raise UnsupportedSpecError(
                f"hires.upscaler: {model!r} ({self.name}) takes 'lanczos' only (its latents are not an image to "
                "resize as they are); send upscaler 'lanczos'"
            )

    def check_prompts(self, spec: RenderSpec, model: str) -> None:
        """Refuse an `a1111` prompt the family cannot encode as written (a plain one it reads as text), and a
        guidance curve it cannot follow step by step."""
        if spec.prompt_syntax == "a1111" and not self.prompt_encoding:
            for name, spans in prompt_spans(spec):
                if len(spans) > 1 or any(not prompt.is_plain() for _, prompt in spans):
                    raise UnsupportedSpecError(
                        f"{name}: {model!r} ({self.name}) has no weights, BREAK or prompt editing in this worker; "
                        "remove them or send prompt_syntax 'plain'"
                    )
        if spec.guidance is None:
            return
        if self.guidance_curve is not None:
            raise UnsupportedSpecError(f"guidance: {model!r} ({self.name}) {self.guidance_curve}; remove `guidance`")
        from producer.spec import guidance_at

        steps = spec.denoising_steps
        lowest = min(guidance_at(spec.guidance, i, steps) for i in range(steps))
        floor, why = self.guidance_floor
        if lowest <= floor:
            raise UnsupportedSpecError(
                f"guidance: every step's scale must be above {floor:g} on {model!r} ({self.name}): at {floor:g} or "
                f"below {why}; got {lowest:g}. Keep the curve above {floor:g}, and end guidance with a cfg_cutoff "
                "callback"
            )

    def plain_prompt_tokens(self, pipe: Any, prompt: str) -> dict[str, tuple[int, int]]:
        """For a `plain` prompt, per CLIP or T5 text encoder: the prompt's tokens and how many of them the encoder
        sees as diffusers cuts them (75 for CLIP; the pipeline's default `max_sequence_length` less its end token
        for T5). LLM encoders are left out."""
        found: dict[str, tuple[int, int]] = {}
        for tokenizer_name, encoder_name in PLAIN_ENCODERS:
            tokenizer, encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
            kind = str(getattr(getattr(encoder, "config", None), "model_type", ""))
            if tokenizer is None or not kind.startswith(("clip", "t5", "umt5")):
                continue
            count = len(tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"])
            most = CLIP_TOKENS if kind.startswith("clip") else int(getattr(self, "t5_length", 512)) - 1
            found[encoder_name] = (count, min(count, most))
        return found

    def prompt_conditioning(self, pipe: Any, spec: RenderSpec, prompt: Any, *, negative: bool = False) -> Any:
        """`prompt` (a `producer.prompt_syntax.Weighted`) encoded for one image: a
        `worker.models.prompt_embeds.Encoded`; `negative`: it is the negative prompt."""
        raise NotImplementedError

    def conditioning_arguments(self, positive: Any, negative: Any) -> dict[str, Any]:
        """The pipeline arguments that pass encoded prompts in place of `prompt` and `negative_prompt`."""
        raise NotImplementedError

    def loop_conditioning(self, positive: Any, negative: Any, images: int, guided: bool) -> dict[str, torch.Tensor]:
        """The loop's tensors (`prompt_schedule_inputs`) for `images` images of the encoded prompts, as the loop
        holds them (`guided`: with its CFG batch doubled, negative rows first)."""
        raise NotImplementedError

    def cfg_cutoff(self, spec: CfgCutoff, kind: Kind, *, ip_adapter: bool = False) -> Any:
        """The step callback that ends classifier-free guidance at the spec's step; raise why not where it cannot."""
        raise UnsupportedSpecError(f"callbacks: a cfg_cutoff does not apply to {self.name} models")

    # --- the loop --------------------------------------------------------------------------------------------

    def preview(self, pipe: Any, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        """The loop's latents of a `height` x `width` image as (n, h, w, 3) uint8 preview pixels, on the latents'
        device; no VAE."""
        raise NotImplementedError

    def decode(self, pipe: Any, latents: torch.Tensor, height: int = 0, width: int = 0) -> torch.Tensor:
        """The VAE decode and post-processing that ends a text2img call, for rows that leave a shared call: pixels
        as the pipeline's `output_type="pt"` gives them, on the CPU."""
        raise NotImplementedError

    def adjust_arguments(self, spec: RenderSpec, arguments: dict[str, Any]) -> None:
        """Rename or add the family's own pipeline arguments (`arguments` are `pipeline_arguments`'s, in place): e.g.
        a family whose CFG scale is `true_cfg_scale`."""

    def before_call(self, spec: RenderSpec, seed: int) -> None:
        """Just before the pipeline call of a job (or a shared call, with its first image's seed)."""

    # --- a shared call ----------------------------------------------------------------------------------------

    def batchable(self, pipe: Any) -> bool:
        """Whether the loop can take several jobs' rows in one call."""
        return False

    def can_drop_rows(self, pipe: Any) -> bool:
        """Whether rows can leave a running call (every per-row tensor of the loop is a callback tensor)."""
        return False

    def batch_tensor_inputs(self, pipe: Any) -> list[str]:
        """The loop's per-row tensors a shared call reads and slices (`callback_on_step_end_tensor_inputs`)."""
        return ["latents"]

    def drop_rows(self, callback_kwargs: dict[str, Any], index: torch.Tensor, guided: torch.Tensor) -> None:
        """Keep `index` rows of the loop's per-row tensors (`guided`: the same rows of the doubled CFG batch)."""
        raise NotImplementedError

    # --- samplers, prompts ---------------------------------------------------------------------------------------

    def make_scheduler(self, name: str, checkpoint_scheduler: Any) -> tuple[Any, Any]:
        """A fresh scheduler for one job (`name`, or the checkpoint's own for "default") and its manifest record."""
        raise NotImplementedError

    def clip_skip_arguments(self, pipe: Any, spec: RenderSpec, prompt: str | list[str] | None = None) -> dict[str, Any]:
        return {}

    def check_loaded(self, pipe: Any, spec: RenderSpec) -> None:
        """Refuse what only the loaded model tells (SD: a clip_skip deeper than its encoders; Flux.2: a cutoff on a
        distilled model), before the job's first step."""

    # --- compile ---------------------------------------------------------------------------------------------------

    def compile(self, pipe: Any, mode: str) -> None:
        """torch.compile the loop's model in place: `regional`, its repeated blocks once each where diffusers knows
        them (`compile_repeated_blocks`), else the whole model; `full`, the whole model."""
        model = self.model(pipe)
        if mode == "regional" and getattr(model, "_repeated_blocks", None):
            model.compile_repeated_blocks(fullgraph=True)
        else:
            model.compile()

    # --- step caches ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step_cache(self, pipe: Any, cache: StepCache | None) -> Iterator[None]:
        """The job's step cache on the model for the block, and none after it, however the block ends: a cache's
        state (the last residuals, the Taylor factors) must not reach the next job."""
        if cache is None:
            yield
            return
        model = self.model(pipe)
        model.enable_cache(_cache_config(cache))
        try:
            yield
        finally:
            model.disable_cache()

    # --- resume ------------------------------------------------------------------------------------------------

    def model_off(self, pipe: Any) -> ModelOff:
        """Turn the per-step model off while a resume replays the steps before its checkpoint (`close()` undoes it)."""
        return ModelOff(self.model(pipe), lambda sample: sample.new_zeros(sample.shape))

    # --- the tiny LoRA -------------------------------------------------------------------------------------------

    def lora_text_encoders(self, pipe: Any) -> Sequence[str]:
        """The pipeline's text encoders a LoRA may target (CLIP ones: diffusers' loaders take those)."""
        return [
            name
            for name in ("text_encoder", "text_encoder_2")
            if getattr(getattr(pipe, name, None), "config", None) is not None
            and getattr(getattr(pipe, name).config, "model_type", "")
            in ("clip_text_model", "clip_text_with_projection")
        ]


def prompt_spans(spec: RenderSpec) -> list[tuple[str, list[tuple[int, Weighted]]]]:
    """The `a1111` prompt and negative prompt of `spec`, each as (first step, prompt) spans."""
    from producer import prompt_syntax

    found = []
    for name in ("prompt", "negative_prompt"):
        text = getattr(spec, name)
        spans = prompt_syntax.schedule(text, spec.denoising_steps) if text else []
        found.append((name, [(span.first_step, span.prompt) for span in spans]))
    return found


class ModelOff:
    """While a resume replays the steps before its checkpoint, the model returns `zeros(sample)` without running:
    the latents of those steps are thrown away at the checkpoint's step, and only the callbacks' effects matter."""

    def __init__(self, model: Any, zeros: Callable[[torch.Tensor], torch.Tensor], output: Any = None) -> None:
        self.model = model
        self.before = model.__dict__.get("forward")  # an instance-level forward (accelerate's offload hook) stays

        def forward(*args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
            sample: torch.Tensor = args[0] if args else kwargs["sample" if "sample" in kwargs else "hidden_states"]
            out = zeros(sample)
            if not return_dict:
                return (out,)
            if output is not None:
                return output(sample=out)
            return Transformer2DModelOutput(sample=out)

        model.forward = forward

    def close(self) -> None:
        if self.before is not None:
            self.model.forward = self.before
        else:
            self.model.__dict__.pop("forward", None)


def _cache_config(cache: StepCache) -> Any:
    """diffusers' config object for a spec's `cache`."""
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if cache.type == "first_block":
        return FirstBlockCacheConfig(threshold=cache.threshold)
    return TaylorSeerCacheConfig(cache_interval=cache.interval, disable_cache_before_step=cache.warmup_steps)
