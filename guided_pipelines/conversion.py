"""Conversion of the original guided-diffusion checkpoints (``64x64_diffusion.pt`` …) into diffusers
models, with presets for the 15 released files.

Parameter names are the original ones, so conversion is a checked ``load_state_dict``; the work is
in reproducing each constructor's architecture from its command-line flags (``script_util.py``)."""

from __future__ import annotations

import difflib
import inspect
import json
import os

import torch

from .models import ADMClassifierModel, ADMSuperResUNet2DModel, ADMUNet2DModel

KINDS = ("unet", "superres", "classifier")
# Constructor keywords that change nothing in the computation here.
_IGNORED_KWARGS = ("use_fp16", "use_checkpoint", "dims")


def model_from_original(kind: str, state_dict: dict | None = None, **kwargs):
    """Build the model the original constructor (``UNetModel``, ``SuperResModel`` or
    ``EncoderUNetModel``) would build from ``kwargs`` — its own keyword names, with
    ``attention_resolutions`` as downsample rates — and load ``state_dict`` (original key names) into it.

    Returns a float32 model in eval mode. With ``state_dict=None`` the weights stay as initialised.
    Keywords ``use_fp16``, ``use_checkpoint`` and ``low_res_size`` are accepted and ignored
    (``low_res_size`` is kept in the super-res config for reference)."""
    model = _build(kind, kwargs)
    if state_dict is not None:
        load_original_state_dict(model, state_dict)
    return model.float().eval()


def _build(kind: str, kwargs: dict, device=None):
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    kwargs = dict(kwargs)
    if kwargs.get("dims", 2) != 2:
        raise ValueError("only 2-D models (dims=2) are supported")
    for key in _IGNORED_KWARGS:
        kwargs.pop(key, None)
    if "image_size" in kwargs:
        kwargs["sample_size"] = kwargs.pop("image_size")
    for key in ("attention_resolutions", "channel_mult"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if kind == "classifier":
        if "out_channels" in kwargs:
            kwargs["num_classes"] = kwargs.pop("out_channels")
        cls = ADMClassifierModel
    elif kind == "superres":
        cls = ADMSuperResUNet2DModel
    else:
        kwargs.pop("low_res_size", None)
        cls = ADMUNet2DModel
    unknown = set(kwargs) - set(inspect.signature(cls.__init__).parameters)
    if unknown:
        raise ValueError(f"unknown {kind} arguments: {', '.join(sorted(unknown))}")
    if device is not None:
        with torch.device(device):
            return cls(**kwargs)
    return cls(**kwargs)


def load_original_state_dict(model: torch.nn.Module, state_dict: dict, preset: str | None = None) -> None:
    """Load an original ``state_dict`` into ``model`` after checking keys and shapes; on a mismatch
    raise a ``ValueError`` that lists the missing/unexpected keys, the shape mismatches and, where the
    keys identify one, the preset that fits."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or shapes:
        lines = [f"checkpoint does not fit {'preset ' + repr(preset) if preset else 'this architecture'}:"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_shorten(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_shorten(unexpected)}")
        if shapes:
            lines.append(
                "  shape mismatches: "
                + _shorten([f"{k} checkpoint {list(got[k])} vs model {list(expected[k])}" for k in shapes])
            )
        fits = infer_preset(state_dict)
        if fits and fits != preset:
            lines.append(f"  the checkpoint's keys and shapes match preset {fits!r}: pass --preset {fits}")
        elif not fits:
            lines.append("  no released preset matches these keys either; pass the architecture explicitly")
        raise ValueError("\n".join(lines))
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)


def _shorten(items: list, limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------------
# The original command-line flags → constructor keywords (script_util.py of guided-diffusion).

_MODEL_DEFAULTS = dict(
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=-1,
    attention_resolutions="16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_new_attention_order=False,
    learn_sigma=False,
)
_CLASSIFIER_DEFAULTS = dict(
    image_size=64,
    classifier_width=128,
    classifier_depth=2,
    classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
)
NUM_CLASSES = 1000


def _channel_mult(image_size: int, channel_mult: str = "", classifier: bool = False) -> tuple:
    if channel_mult:
        return tuple(int(c) for c in channel_mult.split(","))
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    }
    if image_size not in table:
        raise ValueError(f"no default channel_mult for image size {image_size}; pass channel_mult")
    return table[image_size]


def _ds(image_size: int, resolutions: str) -> tuple:
    return tuple(image_size // int(r) for r in resolutions.split(","))


def kwargs_from_flags(kind: str, flags: dict) -> dict:
    """Constructor keywords for the original command-line ``flags`` (as in ``released_checkpoints.json``)."""
    if kind == "classifier":
        f = {**_CLASSIFIER_DEFAULTS, **flags}
        size = f["image_size"]
        return dict(
            image_size=size,
            in_channels=3,
            model_channels=f["classifier_width"],
            out_channels=NUM_CLASSES,
            num_res_blocks=f["classifier_depth"],
            attention_resolutions=_ds(size, f["classifier_attention_resolutions"]),
            channel_mult=_channel_mult(size),
            num_head_channels=64,
            use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
            resblock_updown=f["classifier_resblock_updown"],
            pool=f["classifier_pool"],
        )
    f = {**_MODEL_DEFAULTS, **flags}
    if kind == "superres":
        size = f["large_size"]
        channel_mult = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}.get(size)
        if channel_mult is None:
            raise ValueError(f"unsupported super-res large_size {size}")
    else:
        size = f["image_size"]
        channel_mult = _channel_mult(size, f["channel_mult"])
    kwargs = dict(
        image_size=size,
        in_channels=3,
        model_channels=f["num_channels"],
        out_channels=6 if f["learn_sigma"] else 3,
        num_res_blocks=f["num_res_blocks"],
        attention_resolutions=_ds(size, f["attention_resolutions"]),
        dropout=f["dropout"],
        channel_mult=channel_mult,
        num_classes=NUM_CLASSES if f["class_cond"] else None,
        num_heads=f["num_heads"],
        num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"],
        use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"],
        use_new_attention_order=f["use_new_attention_order"],
    )
    if kind == "superres":
        kwargs["low_res_size"] = f["small_size"]
    return kwargs


# --------------------------------------------------------------------------------------------------
# The 15 released checkpoints: architecture flags (from the original README) and diffusion settings.

_IMAGENET_UNET = dict(
    diffusion_steps=1000,
    learn_sigma=True,
    resblock_updown=True,
    use_scale_shift_norm=True,
    attention_resolutions="32,16,8",
    noise_schedule="linear",
    num_channels=256,
    num_head_channels=64,
    num_res_blocks=2,
)
_LSUN = dict(_IMAGENET_UNET, class_cond=False, dropout=0.1, image_size=256)
_CLASSIFIER = dict(classifier_width=128, classifier_depth=2, classifier_attention_resolutions="32,16,8",
                   classifier_use_scale_shift_norm=True, classifier_resblock_updown=True, classifier_pool="attention")

PRESETS: dict[str, dict] = {
    "64x64_diffusion.pt": dict(
        kind="unet",
        flags=dict(_IMAGENET_UNET, class_cond=True, dropout=0.1, image_size=64, noise_schedule="cosine",
                   num_channels=192, num_res_blocks=3, use_new_attention_order=True),
        classifier="64x64_classifier.pt", classifier_scale=1.0, respacing="250", dataset="imagenet",
    ),
    "128x128_diffusion.pt": dict(
        kind="unet",
        flags=dict(_IMAGENET_UNET, class_cond=True, image_size=128, num_heads=4, num_head_channels=-1),
        classifier="128x128_classifier.pt", classifier_scale=0.5, respacing="250", dataset="imagenet",
    ),
    "256x256_diffusion.pt": dict(
        kind="unet", flags=dict(_IMAGENET_UNET, class_cond=True, image_size=256),
        classifier="256x256_classifier.pt", classifier_scale=1.0, respacing="250", dataset="imagenet",
    ),
    "256x256_diffusion_uncond.pt": dict(
        kind="unet", flags=dict(_IMAGENET_UNET, class_cond=False, image_size=256),
        classifier="256x256_classifier.pt", classifier_scale=10.0, respacing="250", dataset="imagenet",
    ),
    "512x512_diffusion.pt": dict(
        kind="unet", flags=dict(_IMAGENET_UNET, class_cond=True, image_size=512),
        classifier="512x512_classifier.pt", classifier_scale=4.0, respacing="250", dataset="imagenet",
    ),
    "lsun_bedroom.pt": dict(kind="unet", flags=dict(_LSUN), respacing="1000", dataset="lsun"),
    "lsun_cat.pt": dict(kind="unet", flags=dict(_LSUN), respacing="1000", dataset="lsun"),
    "lsun_horse.pt": dict(kind="unet", flags=dict(_LSUN), respacing="1000", dataset="lsun"),
    "lsun_horse_nodropout.pt": dict(kind="unet", flags=dict(_LSUN, dropout=0.0), respacing="1000", dataset="lsun"),
    "64_256_upsampler.pt": dict(
        kind="superres",
        flags=dict(_IMAGENET_UNET, class_cond=True, large_size=256, small_size=64, num_channels=192,
                   num_heads=4, num_head_channels=-1),
        respacing="250", dataset="imagenet",
    ),
    "128_512_upsampler.pt": dict(
        kind="superres",
        flags=dict(_IMAGENET_UNET, class_cond=True, large_size=512, small_size=128, num_channels=192,
                   attention_resolutions="32,16"),
        respacing="250", dataset="imagenet",
    ),
    "64x64_classifier.pt": dict(kind="classifier", flags=dict(_CLASSIFIER, image_size=64, classifier_depth=4)),
    "128x128_classifier.pt": dict(kind="classifier", flags=dict(_CLASSIFIER, image_size=128)),
    "256x256_classifier.pt": dict(kind="classifier", flags=dict(_CLASSIFIER, image_size=256)),
    "512x512_classifier.pt": dict(kind="classifier", flags=dict(_CLASSIFIER, image_size=512)),
}
for _name, _preset in PRESETS.items():
    if _preset["kind"] != "classifier":
        _preset["beta_schedule"] = _preset["flags"]["noise_schedule"]
        _preset["learn_sigma"] = _preset["flags"]["learn_sigma"]
        _preset["num_train_timesteps"] = _preset["flags"]["diffusion_steps"]


def preset_kwargs(name: str) -> tuple[str, dict]:
    """``(kind, constructor keywords)`` of a released checkpoint's preset."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known presets: {', '.join(PRESETS)}"
        raise ValueError(f"unknown preset {name!r}{hint}")
    preset = PRESETS[name]
    return preset["kind"], kwargs_from_flags(preset["kind"], preset["flags"])


def preset_model(name: str, device=None):
    """The (randomly initialised) model of preset ``name``; ``device="meta"`` builds it without memory."""
    kind, kwargs = preset_kwargs(name)
    return _build(kind, kwargs, device=device)


def preset_shapes(name: str) -> dict:
    """``{key: shape}`` of the state_dict preset ``name`` expects (built on the meta device)."""
    return {k: tuple(v.shape) for k, v in preset_model(name, device="meta").state_dict().items()}


def infer_preset(state_dict: dict, file_name: str | None = None) -> str | None:
    """The preset whose key set and shapes match ``state_dict`` (the file name breaks ties)."""
    if file_name is not None and os.path.basename(file_name) in PRESETS:
        candidates = [os.path.basename(file_name)] + [p for p in PRESETS if p != os.path.basename(file_name)]
    else:
        candidates = list(PRESETS)
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    for name in candidates:
        if preset_shapes(name) == got:
            return name
    return None


def load_checkpoint(path: str) -> dict:
    """Read an original ``.pt`` state_dict safely (``weights_only=True``) or a ``.safetensors`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or pickled with arbitrary objects
        raise ValueError(
            f"cannot read {path!r} as a PyTorch state_dict with weights_only=True ({type(err).__name__}: {err}); "
            "the file is corrupt or not an original guided-diffusion checkpoint"
        ) from err
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path!r} does not hold a state_dict of tensors")
    return state_dict


def convert_checkpoint(path: str, preset: str | None = None):
    """Load the released checkpoint at ``path`` into its diffusers model; returns ``(model, preset_name)``."""
    state_dict = load_checkpoint(path)
    if preset is None:
        name = os.path.basename(path)
        preset = name if name in PRESETS else infer_preset(state_dict)
        if preset is None:
            raise ValueError(
                f"cannot tell which released model {path!r} is: its file name is not one of "
                f"{', '.join(PRESETS)} and its keys match no preset; pass --preset NAME, or --config ARCH.json "
                "(kind + original constructor arguments) for an architecture of your own"
            )
    kind, kwargs = preset_kwargs(preset)
    model = _build(kind, kwargs)
    load_original_state_dict(model, state_dict, preset=preset)
    return model.float().eval(), preset


# --------------------------------------------------------------------------------------------------
# CLI: guided-pipelines convert --checkpoint PATH.pt [--preset NAME | --config ARCH.json]
#                               [--classifier PATH.pt [--classifier-preset NAME | --classifier-config ARCH.json]]
#                               --output DIR


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="original .pt (or .safetensors) file, e.g. 64x64_diffusion.pt"
    )
    arch = parser.add_mutually_exclusive_group()
    arch.add_argument("--preset", choices=sorted(PRESETS), help="released model (default: from the file name or keys)")
    arch.add_argument(
        "--config",
        help="architecture of a checkpoint that is not a released one: a JSON file with 'kind' "
        "(unet, superres or classifier) and the original constructor's keyword arguments",
    )
    parser.add_argument("--classifier", help="original classifier .pt to bundle for guidance")
    carch = parser.add_mutually_exclusive_group()
    carch.add_argument(
        "--classifier-preset", choices=sorted(p for p in PRESETS if PRESETS[p]["kind"] == "classifier")
    )
    carch.add_argument("--classifier-config", help="like --config, for the --classifier checkpoint")
    parser.add_argument(
        "--noise-schedule", choices=("linear", "cosine"), help="training schedule (default: the preset's or linear)"
    )
    parser.add_argument("--diffusion-steps", type=int, help="training diffusion steps (default: the preset's, or 1000)")
    parser.add_argument(
        "--output",
        required=True,
        help="folder to write (diffusers layout, safetensors): a pipeline, or a model for a lone classifier",
    )


def read_config(path: str) -> tuple[str, dict]:
    """``(kind, constructor keywords)`` from an architecture JSON file (``{"kind": ..., **kwargs}``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"architecture config {path!r} does not exist")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"architecture config {path!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("kind") not in KINDS:
        raise ValueError(
            f"architecture config {path!r} must be a JSON object with \"kind\" one of {', '.join(KINDS)} "
            "plus the original constructor's keyword arguments (image_size, model_channels, …)"
        )
    config = dict(config)
    return config.pop("kind"), config


def _convert(path: str, preset: str | None, config: str | None):
    """``(model, preset or None)``: a checkpoint converted through a preset or an architecture config."""
    if config is None:
        return convert_checkpoint(path, preset)
    kind, kwargs = read_config(config)
    return model_from_original(kind, load_checkpoint(path), **kwargs), None


def run(args) -> int:
    if (args.classifier_preset or args.classifier_config) and not args.classifier:
        raise ValueError("--classifier-preset/--classifier-config describe a --classifier PATH; pass it too")
    model, preset = _convert(args.checkpoint, args.preset, args.config)
    classifier = None
    if args.classifier:
        if isinstance(model, ADMClassifierModel):
            raise ValueError(
                f"{args.checkpoint!r} is a classifier itself; --classifier bundles one with a diffusion model"
            )
        classifier, cpreset = _convert(args.classifier, args.classifier_preset, args.classifier_config)
        if not isinstance(classifier, ADMClassifierModel):
            kind = cpreset or "by its config"
            raise ValueError(f"{args.classifier!r} is a diffusion model ({kind}), not a classifier")
    write_converted(
        model, preset, args.output, classifier=classifier,
        noise_schedule=args.noise_schedule, diffusion_steps=args.diffusion_steps,
    )  # fmt: skip
    source = preset or os.path.basename(args.config)
    print(f"converted {args.checkpoint} ({source}) -> {args.output}")
    return 0


def imagenet_labels() -> dict[int, str]:
    """ImageNet-1k class id → WordNet synonyms ("tench, Tinca tinca"), from ``imagenet_labels.json``."""
    with open(os.path.join(os.path.dirname(__file__), "imagenet_labels.json")) as f:
        return dict(enumerate(json.load(f)))


def write_converted(
    model,
    preset: str | None,
    output: str,
    classifier=None,
    noise_schedule: str | None = None,
    diffusion_steps: int | None = None,
) -> None:
    """Save a converted model to ``output`` (diffusers layout, safetensors).

    A classifier alone is saved as a model folder. A diffusion model becomes a pipeline folder:
    :class:`ClassifierGuidedPipeline` (with ``classifier``, and the preset's published guidance scale as
    ``recommended_classifier_scale``) or, for a super-res model, :class:`ADMUpsamplePipeline`; its
    :class:`ADMScheduler` takes the noise schedule and step count from ``preset`` unless given, and
    learned variance iff the model has twice as many output as input channels. 1000-class models get
    the ImageNet class names as ``id2label``."""
    if isinstance(model, ADMClassifierModel):
        if classifier is not None:
            raise ValueError("a classifier cannot bundle another classifier")
        model.save_pretrained(output, safe_serialization=True)
        return
    from .pipelines import ADMUpsamplePipeline, ClassifierGuidedPipeline
    from .schedulers import ADMScheduler

    settings = PRESETS.get(preset, {}) if preset else {}
    learned = model.config.out_channels == 2 * model.config.in_channels
    scheduler = ADMScheduler(
        num_train_timesteps=diffusion_steps or settings.get("num_train_timesteps", 1000),
        beta_schedule=noise_schedule or settings.get("beta_schedule", "linear"),
        variance_type="learned_range" if learned else "fixed_large",
    )
    num_classes = model.config.num_classes or (classifier.config.num_classes if classifier is not None else None)
    id2label = imagenet_labels() if num_classes == NUM_CLASSES else None
    if isinstance(model, ADMSuperResUNet2DModel):
        if classifier is not None:
            raise ValueError("the super-res model is not guided; convert it without --classifier")
        pipe = ADMUpsamplePipeline(unet=model, scheduler=scheduler, id2label=id2label)
    else:
        scale = settings.get("classifier_scale") if classifier is not None else None
        pipe = ClassifierGuidedPipeline(
            unet=model, scheduler=scheduler, classifier=classifier, id2label=id2label,
            recommended_classifier_scale=scale,
        )  # fmt: skip
    pipe.save_pretrained(output, safe_serialization=True)
