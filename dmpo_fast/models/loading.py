"""``load(name_or_path)``, ``wrap(model)``, the built-in tiny model, and saving LLaDA checkpoints.

``load`` dispatches on ``config.json``'s ``model_type``:

- ``"llada"``: the built-in implementation; ``config.json`` + ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``) load without remote code, tensors go straight to ``device`` in ``dtype``;
- ``"Dream"``: Dream's own remote code through :class:`DreamAdapter` — only with ``trust_remote_code=True``;
- anything else: ``AutoModelForMaskedLM`` / ``AutoModelForCausalLM`` through the verified :class:`HFAdapter`.

A ``name_or_path`` that is not a local directory is taken as a hub id (``owner/name``) and downloaded — only
then, only when a user asks for it. Every model comes back in eval mode, like ``from_pretrained``.

``load_in_4bit`` / ``load_in_8bit`` quantize the base as it loads (bitsandbytes through transformers'
``from_pretrained``, the output layer kept in 16-bit): see :mod:`.quantization`.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file

from .base import DiffusionLM
from .configuration_llada import LLaDAConfig
from .hf_adapter import DreamAdapter, HFAdapter
from .llada import LLaDAModelLM
from .llada_lm import LLaDADiffusionLM
from .quantization import bnb_config, check_flags, prepare, skip_modules

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_FILES = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.tiktoken"]
_LLADA_KEY = re.compile(
    r"model\.transformer\.(wte\.weight|ff_out\.(weight|bias)|ln_f\.(weight|bias)|"
    r"blocks\.\d+\.(attn_norm|ff_norm|q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)\.(weight|bias))"
)


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be None, a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def _resolve_dir(name_or_path, revision: str | None) -> str:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(
            f"name_or_path must be a directory or a hub id string, got {type(name_or_path).__name__}"
        )
    path = os.fspath(name_or_path)
    builtin = _builtin_dir(path)
    if builtin is not None:
        return builtin
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"name_or_path {path!r} is a file; expected a checkpoint directory")
    if _HUB_ID.fullmatch(path):
        try:
            from huggingface_hub import snapshot_download  # noqa: PLC0415

            return snapshot_download(path, revision=revision, allow_patterns=_HUB_FILES)
        except Exception as err:
            raise ValueError(
                f"name_or_path {path!r} is not a local directory and could not be fetched from the hub: {err}"
            ) from err
    raise ValueError(
        f"name_or_path {path!r} is neither an existing checkpoint directory nor a hub id of the form "
        "owner/name"
    )


def _builtin_dir(name: str) -> str | None:
    """The directory of a built-in tiny model name ("tiny", "tiny_countdown", ...), None for other names;
    ``FileNotFoundError`` with the build command when the model is not built."""
    from dmpo_fast.assets import TINY_MODELS, _asset_dir, build_command

    if name not in TINY_MODELS:
        return None
    path = _asset_dir(TINY_MODELS[name])
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the built-in model {name!r} is not in this installation ({path}); build it from the repository "
            f"root with `{build_command(TINY_MODELS[name])}`"
        )
    return str(path)


def load_tokenizer(name_or_path, *, hf: bool = False, trust_remote_code: bool = False, revision=None):
    """The tokenizer that comes with a model: a built-in name or a directory holding dmpo_fast's character
    tokenizer gives a ``CharTokenizer`` (with ``hf=True`` the equivalent ``PreTrainedTokenizerFast``, as
    TRL and the HF Trainer want); anything else transformers' ``AutoTokenizer`` (left padding)."""
    from dmpo_fast.tokenizer import CharTokenizer

    path = _checkpoint_of_run(_resolve_dir(name_or_path, revision))
    try:
        char = CharTokenizer.load(path)
    except ValueError:
        char = None
    if char is not None:
        if not hf:
            return char
        from dmpo_fast.integrations.hf_tokenizer import hf_char_tokenizer

        return hf_char_tokenizer(char)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    return tokenizer


def load(
    name_or_path,
    *,
    dtype=None,
    device=None,
    trust_remote_code: bool = False,
    mask_id: int | None = None,
    revision: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
) -> DiffusionLM:
    """Load a built-in model name ("tiny", "tiny_countdown"), a checkpoint directory or a hub id as a
    :class:`DiffusionLM` (eval mode). Its tokenizer: ``load_tokenizer(name_or_path)``.

    dtype: None (as stored), a torch.dtype or "float32"/"bfloat16"/"float16". device: where the weights go.
    trust_remote_code: required for models whose code lives in the checkpoint (Dream); never needed for LLaDA.
    mask_id: the [MASK] token id for models whose config does not name one (``mask_token_id``).
    load_in_4bit / load_in_8bit: quantize the linear layers (NF4 with double quantization / LLM.int8), all but
    the output layer; the 4-bit matmuls compute in ``dtype``. Needs bitsandbytes (``pip install
    'dmpo-fast[quant]'``); a quantized model trains through a LoRA adapter only.
    """
    check_flags(load_in_4bit, load_in_8bit)  # before any download
    dtype = _resolve_dtype(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    path = _checkpoint_of_run(_resolve_dir(name_or_path, revision))
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
        os.path.join(path, "config.json")
    ):
        return _load_adapter(path, dtype, device, trust_remote_code, mask_id, load_in_4bit, load_in_8bit)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"name_or_path {path!r} has no config.json")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file!r} is not a readable JSON file: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_file!r} must hold a JSON object of settings, got a {type(config).__name__}"
        )
    model_type = config.get("model_type")
    quant = {"load_in_4bit": load_in_4bit, "load_in_8bit": load_in_8bit}
    if model_type == "llada":
        return LLaDADiffusionLM(load_llada(path, dtype=dtype, device=device, **quant)).eval()
    return _load_hf(path, model_type, dtype, device, trust_remote_code, mask_id, quant)


def _checkpoint_of_run(path: str) -> str:
    """A trainer run directory means its newest checkpoint (a model in Hugging Face form); other paths stay."""
    if os.path.isdir(os.path.join(path, "checkpoints")) and not os.path.isfile(os.path.join(path, "config.json")):
        from dmpo_fast.run_io import RunDir

        latest = RunDir(path, resume=True, main=False).latest_checkpoint()
        if latest is None:
            raise ValueError(f"name_or_path {path!r} is a run directory without checkpoints")
        return str(latest)
    return path


def _load_adapter(path, dtype, device, trust_remote_code, mask_id, load_in_4bit, load_in_8bit) -> DiffusionLM:
    """A PEFT adapter directory (a LoRA / QLoRA checkpoint): its base model (``dmpo_fast.json``'s, else the
    adapter config's ``base_model_name_or_path``), loaded as the run loaded it, with the adapter on top."""
    info_file = os.path.join(path, "dmpo_fast.json")
    info = {}
    if os.path.isfile(info_file):
        with open(info_file) as f:
            info = json.load(f)
    with open(os.path.join(path, "adapter_config.json")) as f:
        base = info.get("base_model") or json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"adapter {path!r} names no base model (base_model_name_or_path)")
    try:
        from peft import PeftModel  # noqa: PLC0415
    except ImportError as e:
        raise ValueError(f"{path!r} is a LoRA adapter: loading it needs peft (pip install 'dmpo-fast[lora]')") from e
    lm = load(
        base, dtype=dtype if dtype is not None else info.get("dtype"), device=device,
        trust_remote_code=trust_remote_code or info.get("trust_remote_code", False), mask_id=mask_id,
        load_in_4bit=load_in_4bit or info.get("load_in_4bit", False),
        load_in_8bit=load_in_8bit or info.get("load_in_8bit", False),
    )  # fmt: skip
    lm.model = PeftModel.from_pretrained(lm.model, path)
    return lm.eval()


def load_llada(
    path: str,
    *,
    dtype: torch.dtype | None = None,
    device=None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
) -> LLaDAModelLM:
    """The ``LLaDAModelLM`` in directory ``path``, built on the meta device and filled from safetensors.

    Quantized (``load_in_4bit`` / ``load_in_8bit``): through transformers' ``from_pretrained`` with a
    ``BitsAndBytesConfig``, which quantizes each weight on its way to ``device``."""
    if load_in_4bit or load_in_8bit:
        return _load_llada_quantized(path, dtype, device, load_in_4bit, load_in_8bit)
    config = LLaDAConfig.from_pretrained(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"name_or_path {path!r} has no model.safetensors or model.safetensors.index.json")
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = {}
    for name in files:
        for key, tensor in load_file(os.path.join(path, name), device=str(device)).items():
            state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"name_or_path {path!r}: checkpoint does not match its config.json; missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _load_llada_quantized(path, dtype, device, load_in_4bit, load_in_8bit) -> LLaDAModelLM:
    config = LLaDAConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = LLaDAModelLM(config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    quantization = bnb_config(
        load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, compute_dtype=dtype, skip=skip_modules(skeleton)
    )
    model = LLaDAModelLM.from_pretrained(
        path,
        config=config,
        quantization_config=quantization,
        device_map={"": str(device)},
        **_dtype_kwargs(dtype),
    )
    return prepare(model).eval()


def save_llada(model: LLaDAModelLM, path: str) -> None:
    """Write ``config.json`` and ``model.safetensors`` (LLaDA's parameter names) into directory ``path``."""
    state = model.state_dict()
    odd = [k for k in state if not _LLADA_KEY.fullmatch(k)]
    if odd:
        raise ValueError(
            f"model has parameters outside LLaDA's layout ({odd[:3]}); merge LoRA adapters first"
        )
    os.makedirs(path, exist_ok=True)
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()},
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = LLaDAConfig.from_dict(model.config.to_dict())
    # auto_map would point transformers at modeling files this directory does not have.
    if hasattr(config, "auto_map"):
        del config.auto_map
    config.save_pretrained(path)


def wrap(model: torch.nn.Module, *, mask_id: int | None = None, eos_id: int | None = None) -> DiffusionLM:
    """A :class:`DiffusionLM` over a built model: LLaDA, Dream (by ``config.model_type``) or generic HF."""
    if isinstance(model, LLaDAModelLM):
        return LLaDADiffusionLM(model)
    config = getattr(model, "config", None)
    mask_id = mask_id if mask_id is not None else getattr(config, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("mask_id must be given: the model's config names no mask_token_id")
    if eos_id is None:
        eos = getattr(config, "eos_token_id", None)
        eos_id = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    cls = DreamAdapter if str(getattr(config, "model_type", "")).lower() == "dream" else HFAdapter
    return cls(model, mask_id=int(mask_id), eos_id=None if eos_id is None else int(eos_id))


def _load_hf(path, model_type, dtype, device, trust_remote_code, mask_id, quant) -> DiffusionLM:
    import transformers  # noqa: PLC0415

    if str(model_type).lower() == "dream" and not trust_remote_code:
        raise ValueError(
            f"name_or_path {path!r} is a Dream checkpoint, whose code ships with the weights: pass "
            "trust_remote_code=True to run it"
        )
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    archs = " ".join(getattr(config, "architectures", None) or [])
    if str(model_type).lower() == "dream" or "ForMaskedLM" not in archs and "ForCausalLM" not in archs:
        classes = [
            transformers.AutoModel,
            transformers.AutoModelForMaskedLM,
            transformers.AutoModelForCausalLM,
        ]
    elif "ForMaskedLM" in archs:
        classes = [transformers.AutoModelForMaskedLM]
    else:
        classes = [transformers.AutoModelForCausalLM]
    kwargs = {"trust_remote_code": trust_remote_code, **_dtype_kwargs(dtype)}
    quantized = quant["load_in_4bit"] or quant["load_in_8bit"]
    errors = []
    for cls in classes:
        try:
            extra = (
                _hf_quantization(cls, config, dtype, device, trust_remote_code, quant) if quantized else {}
            )
            model = cls.from_pretrained(path, **kwargs, **extra)
        except (ValueError, KeyError, OSError) as err:
            errors.append(f"{cls.__name__}: {err}")
            continue
        if model.get_output_embeddings() is not None:
            # A quantized model is already on its device (bitsandbytes layers refuse dtype casts).
            model = prepare(model) if quantized else model.to(device)
            return wrap(model, mask_id=mask_id).eval()
        errors.append(f"{cls.__name__}: no output embeddings")
    raise ValueError(
        f"name_or_path {path!r} (model_type {model_type!r}) loads as no LM with an output head: "
        + "; ".join(errors)
    )


def _dtype_kwargs(dtype: torch.dtype | None) -> dict:
    import transformers  # noqa: PLC0415

    if dtype is None:
        return {}
    # transformers renamed torch_dtype to dtype in 4.56.
    major_minor = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype" if major_minor >= (4, 56) else "torch_dtype": dtype}


def _hf_quantization(cls, config, dtype, device, trust_remote_code, quant) -> dict:
    """``from_pretrained`` keyword arguments that quantize all but the output layer of ``cls``'s model."""
    with torch.device("meta"):  # the module tree only, to name the output layer
        skeleton = cls.from_config(config, trust_remote_code=trust_remote_code)
    if skeleton.get_output_embeddings() is None:
        raise ValueError("no output embeddings")
    quantization = bnb_config(**quant, compute_dtype=dtype, skip=skip_modules(skeleton))
    return {"quantization_config": quantization, "device_map": {"": str(device)}}


def tiny_config(vocab_size: int, **overrides) -> LLaDAConfig:
    """The built-in tiny LLaDA: d_model 128, 4 layers x 4 heads, MLP 344, 512 positions.

    About 0.8M parameters plus 2 * 128 * vocab_size for the embedding and output matrices.

    Defaults: ``mask_token_id = vocab_size - 1``, ``eos_token_id = pad_token_id = vocab_size - 2``; any
    ``LLaDAConfig`` field can be overridden.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    fields = dict(
        d_model=128,
        n_heads=4,
        n_kv_heads=4,
        n_layers=4,
        mlp_hidden_size=344,
        max_sequence_length=512,
        rope_theta=10000.0,
        vocab_size=vocab_size,
        embedding_size=vocab_size,
        weight_tying=False,
        mask_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 2,
        init_fn="mitchell",
    )
    fields.update(overrides)
    return LLaDAConfig(**fields)


def build_tiny(
    vocab_size: int, mask_id: int, eos_id: int | None, seed: int = 0, **overrides
) -> LLaDADiffusionLM:
    """A randomly initialised tiny LLaDA (float32, CPU, train mode); one ``seed`` gives one set of weights."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    if not isinstance(mask_id, int) or not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id must be an int in [0, vocab_size={vocab_size}), got {mask_id!r}")
    if eos_id is not None and (not isinstance(eos_id, int) or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id must be None or an int in [0, vocab_size={vocab_size}), got {eos_id!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    config = tiny_config(
        vocab_size, mask_token_id=mask_id, eos_token_id=eos_id, pad_token_id=eos_id, **overrides
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDAModelLM(config)
    return LLaDADiffusionLM(model.float().train())
