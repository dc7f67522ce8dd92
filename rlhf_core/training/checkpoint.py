"""Saving and loading the policy: safetensors weights (or the peft adapter for
LoRA), the AdamW state, and a small JSON manifest, so a load resumes exactly."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch

from ..model.models import LoadedModel, load_model, lora_from_dict
from .update import PolicyTrainer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or for another setup."""


def save_checkpoint(trainer: PolicyTrainer, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the policy to ``directory`` atomically (a temp folder renamed into place)."""
    lm = trainer.lm
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=target.parent))
    try:
        if lm.lora is not None:
            lm.model.save_pretrained(staging / "adapter")
        else:
            from safetensors.torch import save_model

            save_model(lm.model, str(staging / "model.safetensors"))
        if trainer.optimizer is not None:
            torch.save(trainer.optimizer.state_dict(), staging / "optimizer.pt")
        manifest = {
            "format": FORMAT_VERSION,
            "base_model": lm.name,
            "version": trainer.version,
            "lora": vars(lm.lora) if lm.lora is not None else None,
            "dtype": str(lm.dtype).replace("torch.", ""),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # a new identity for every save: a record naming this folder can tell
            # whether the folder still holds the save it recorded (a name reused)
            "uid": uuid.uuid4().hex,
            "extra": extra or {},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of the checkpoint in ``directory``; CheckpointError when it is missing, invalid JSON
    or another format version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}; this version reads {FORMAT_VERSION}")
    return manifest


def verify_recorded(directory: str | os.PathLike, version: int, uid: str | None) -> dict:
    """The manifest of ``directory`` if it is the save a record describes (its
    version and, when recorded, its uid); CheckpointError when the folder was
    overwritten by another save since."""
    manifest = read_manifest(directory)
    if int(manifest["version"]) != int(version) or (uid is not None and manifest.get("uid") != uid):
        raise CheckpointError(
            f"{directory} no longer holds the recorded save (recorded: version {version}, id {uid or '?'}; "
            f"found: version {manifest['version']}, id {manifest.get('uid') or '?'}): it was overwritten")
    return manifest


def load_into(trainer: PolicyTrainer, directory: str | os.PathLike) -> dict:
    """Load a checkpoint into an already loaded model of the same base and mode."""
    manifest = read_manifest(directory)
    lm = trainer.lm
    directory = Path(directory)
    if manifest["base_model"] != lm.name:
        raise CheckpointError(f"checkpoint is for {manifest['base_model']!r}, the loaded model is {lm.name!r}")
    if (manifest["lora"] is None) != (lm.lora is None):
        mode = "LoRA" if manifest["lora"] is not None else "full fine-tuning"
        raise CheckpointError(f"checkpoint was trained with {mode}; load the model in that mode first")
    saved_lora = lora_from_dict(manifest["lora"])
    if lm.lora is not None and saved_lora != lm.lora:
        raise CheckpointError(f"checkpoint's adapter is {saved_lora}, the loaded model's "
                              f"is {lm.lora}; load the model with the checkpoint's settings first")
    if lm.lora is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = directory / "adapter" / "adapter_model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing")
        set_peft_model_state_dict(lm.model, load_file(str(weights), device=str(lm.device)))
    else:
        from safetensors.torch import load_model as load_safetensors

        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing")
        load_safetensors(lm.model, str(weights), device=str(lm.device))
    trainer.optimizer = None
    trainer.version = int(manifest["version"])
    optimizer_path = directory / "optimizer.pt"
    if optimizer_path.is_file():
        state = torch.load(optimizer_path, map_location=lm.device, weights_only=True)
        trainer.restore_optimizer(state)
    return manifest


def load_checkpoint(directory: str | os.PathLike, device: str | None = None) -> PolicyTrainer:
    """Load the base model named in a checkpoint, then the checkpoint into it."""
    manifest = read_manifest(directory)
    lora = lora_from_dict(manifest["lora"])
    lm: LoadedModel = load_model(manifest["base_model"], device=device, dtype=manifest["dtype"], lora=lora)
    trainer = PolicyTrainer(lm)
    load_into(trainer, directory)
    return trainer
