"""Offline DPO on exported preferences, distributed by accelerate.

    accelerate launch -m rlhf_core.training.train --data prefs.jsonl --model smollm2-135m \\
        [--lora] --algorithm dpo --epochs 1 --lr 5e-6 --beta 0.1 --batch-size 4 --out runs/dpo

reads a TRL preference file (``export --format trl`` or ``trl-text``, or any file
with prompt/chosen/rejected in TRL's conversational or standard format),
tokenises it the way the app does (``prompts.encode_prompt``: the chat template
with the generation prompt, or the plain layout for a tokenizer without one;
each completion ends with EOS), computes the reference log-probs once (each
process scores its share, then they are exchanged), and trains with
``losses.dpo_loss``. accelerate does the distribution: ``accelerator.prepare``
wraps the model (DDP; FSDP or DeepSpeed when accelerate's config says so),
shards the data, and ``accelerator.backward`` / ``clip_grad_norm_`` handle the
gradients. At the end the main process writes a checkpoint in the app's format
(``checkpoint.save_checkpoint``), which ``Engine.load`` reads; with ``--db`` it
is also recorded as the latest checkpoint of ``--workspace``.

Runs as ``python -m rlhf_core.training.train`` too (one process).

A batch holds ``--batch-size`` pairs per process: 2 x batch-size sequences,
prompts left-padded to a common length (with explicit position ids, so a
padded sequence scores exactly like an unpadded one) and completions
right-padded, in one forward pass.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .losses import sequence_logps

log = logging.getLogger("rlhf_core.training.train")


# --------------------------------------------------------------------------- data


def read_preferences(path: str | Path, exclude_rationalised: bool = False) -> list[dict]:
    """Rows with prompt / chosen / rejected from a JSON lines file."""
    from ..storage.importer import read_jsonl_objects

    rows = []
    for lineno, row in read_jsonl_objects(path, empty_message="no preference pairs"):
        if not {"prompt", "chosen", "rejected"} <= row.keys():
            raise ValueError(f"{path}: line {lineno}: a preference row needs prompt, chosen and rejected")
        if exclude_rationalised and row.get("rationalised"):
            continue
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no preference pairs")
    return rows


def _text_of(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return "\n".join(str(m.get("content", "")) for m in value if m.get("role", "assistant") == "assistant")
    raise ValueError(f"{where}: expected a string or a list of assistant messages")


def tokenize_pair(tokenizer, row: dict, max_prompt_tokens: int, max_completion_tokens: int, where: str = "row") -> dict:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} as the app would see them."""
    from ..rollout.prompts import encode_prompt

    prompt = row["prompt"]
    if isinstance(prompt, list):
        prompt_ids = encode_prompt(tokenizer, [{"role": m["role"], "content": m["content"]} for m in prompt])
    elif isinstance(prompt, str):
        prompt_ids = tokenizer(prompt)["input_ids"]
        if tokenizer.bos_token_id is not None and (not prompt_ids or prompt_ids[0] != tokenizer.bos_token_id):
            prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    else:
        raise ValueError(f"{where}: prompt must be a string or a list of messages")
    if not prompt_ids:
        raise ValueError(f"{where}: the prompt is empty")
    prompt_ids = [int(i) for i in prompt_ids][-max_prompt_tokens:]  # keep the end: it leads into the answer
    eos = tokenizer.eos_token_id

    def completion(value, name):
        ids = [int(i) for i in tokenizer(_text_of(value, f"{where}: {name}"), add_special_tokens=False)["input_ids"]]
        if eos is not None:
            ids.append(int(eos))
        return ids[:max_completion_tokens]

    return {"prompt_ids": prompt_ids, "chosen_ids": completion(row["chosen"], "chosen"), "rejected_ids": completion(row["rejected"], "rejected")}


def pair_batch(examples: list[dict], pad_id: int, device) -> dict:
    """Chosen rows first, then rejected: [2B, P + T] with prompts left-padded to P
    and completions right-padded to T."""
    seqs = [(e["prompt_ids"], e["chosen_ids"]) for e in examples] + [(e["prompt_ids"], e["rejected_ids"]) for e in examples]
    p = max(len(s[0]) for s in seqs)
    t = max(1, max(len(s[1]) for s in seqs))
    n = len(seqs)
    input_ids = torch.full((n, p + t), pad_id, dtype=torch.long)
    attention = torch.zeros((n, p + t), dtype=torch.long)
    completion = torch.full((n, t), pad_id, dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.float32)
    for i, (prompt, comp) in enumerate(seqs):
        input_ids[i, p - len(prompt) : p] = torch.tensor(prompt, dtype=torch.long)
        attention[i, p - len(prompt) : p] = 1
        if comp:
            input_ids[i, p : p + len(comp)] = torch.tensor(comp, dtype=torch.long)
            attention[i, p : p + len(comp)] = 1
            completion[i, : len(comp)] = torch.tensor(comp, dtype=torch.long)
            mask[i, : len(comp)] = 1.0
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "position_ids": positions.to(device),
        "completion_ids": completion.to(device),
        "completion_mask": mask.to(device),
    }


def batch_logps(model, batch: dict) -> torch.Tensor:
    """[2B, T] per-token log-probs of the completions (0 at padding); one forward."""
    from ..rollout.logprobs import token_logps_from_logits

    t = batch["completion_ids"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        logits_to_keep=t + 1,
    )
    logits = out.logits[:, -(t + 1) : -1, :]
    return token_logps_from_logits(logits, batch["completion_ids"]) * batch["completion_mask"]


def sequence_scores(logps: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Summed log-probs per sequence (IPO: averaged per token), as the online update takes them."""
    return sequence_logps(logps, mask, average=loss_type == "ipo")


# --------------------------------------------------------------------------- training


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of offline DPO training."""
    from .losses import DPO_LOSS_TYPES
    from ..model.models import DEFAULT_MODEL

    p = argparse.ArgumentParser(
        prog="accelerate launch -m rlhf_core.training.train",
        description="Offline DPO on exported preference pairs; writes a checkpoint the app can load.",
    )
    p.add_argument("--data", required=True, help="TRL preference JSONL (export --format trl or trl-text)")
    p.add_argument("--model", default=None, help=f"base model (default: from --init-checkpoint, else {DEFAULT_MODEL})")
    p.add_argument("--init-checkpoint", default=None, help="start from this app checkpoint instead of the reference")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--algorithm", choices=["dpo"], default="dpo")
    p.add_argument("--loss-type", choices=list(DPO_LOSS_TYPES), default="sigmoid")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default: 5e-6 full fine-tuning, 1e-4 LoRA")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per process per step")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-completion-tokens", type=int, default=512)
    p.add_argument("--exclude-rationalised", action="store_true", help="skip pairs involving a rationalised trace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--metrics-out", default=None, help="JSONL of per-step metrics (main process)")
    p.add_argument("--db", default=None, help="also record the checkpoint in this database ...")
    p.add_argument("--workspace", default="offline", help="... as the latest checkpoint of this workspace (default: offline)")
    return p


def _check_args(args) -> None:
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.grad_accum < 1:
        raise ValueError(f"--grad-accum must be >= 1, got {args.grad_accum}")
    if not args.beta > 0:
        raise ValueError(f"--beta must be > 0, got {args.beta}")
    if args.lr is not None and not 0 < args.lr <= 0.1:
        raise ValueError(f"--lr must be in (0, 0.1], got {args.lr}")
    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.max_prompt_tokens < 1 or args.max_completion_tokens < 1:
        raise ValueError("--max-prompt-tokens and --max-completion-tokens must be >= 1")


def _check_workspace(db: str, workspace: str, model: str, mode: str) -> None:
    """Fail before training if ``--workspace`` already holds a policy of another model or mode."""
    from ..storage.store import Store, check_workspace_name

    check_workspace_name(workspace)
    if not Path(db).is_file():
        return
    store = Store(db, readonly=True)
    try:
        ws = store.workspace(workspace)
        used = ws is not None and (store.count("updates", workspace) or store.checkpoints(workspace))
        if used and ws["model"] and (ws["model"], ws["mode"]) != (model, mode):
            raise ValueError(
                f"workspace {workspace!r} in {db} holds a {ws['model']} ({ws['mode']}) policy; "
                f"this run trains {model} ({mode}): pick another --workspace"
            )
    finally:
        store.close()


def _warn_single_cpu_process(accelerator) -> None:
    """``accelerate launch --cpu --num_processes N`` starts N processes only through
    mpirun (``--mpirun_hostfile``); without it accelerate starts one. Say so."""
    launched_for_many = os.environ.get("MASTER_ADDR") and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if accelerator.num_processes == 1 and launched_for_many:
        log.warning(
            "accelerate launch --cpu started a single process: accelerate runs several CPU processes only "
            "through mpirun (--mpirun_hostfile). Without MPI use `accelerate launch --multi_gpu "
            "--num_processes N -m rlhf_core.training.train --cpu ...` (torchrun, gloo backend) or "
            "`torchrun --nproc_per_node N -m rlhf_core.training.train --cpu ...`."
        )


def train(args: argparse.Namespace) -> dict:
    """Run offline DPO as ``args`` say and write the checkpoint (recorded in ``--db`` when given); returns
    the summary: pairs, processes, steps, version, seconds, last step's metrics and ``out``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object, set_seed

    from .checkpoint import load_into, read_manifest, save_checkpoint
    from ..model.cpu_linear import onednn_linear
    from .losses import dpo_loss
    from ..model.models import DEFAULT_MODEL, LoraSettings, load_model, lora_from_dict
    from .update import PolicyTrainer, default_lr

    _check_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Without a GPU, processes started by torchrun (accelerate launch --multi_gpu) must
    # be told they are CPU processes, or each would train alone on all the data.
    cpu = args.cpu or (world > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=cpu)
    _warn_single_cpu_process(accelerator)
    set_seed(args.seed)
    main = accelerator.is_main_process

    # the model: a checkpoint's base and mode, or the named model
    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha) if args.lora else None
    model_name = args.model
    init_version = 0
    if args.init_checkpoint:
        manifest = read_manifest(args.init_checkpoint)
        if model_name and model_name != manifest["base_model"]:
            raise ValueError(f"--init-checkpoint is for {manifest['base_model']!r}, not {model_name!r}")
        model_name = manifest["base_model"]
        lora = lora_from_dict(manifest["lora"])
    model_name = model_name or DEFAULT_MODEL
    if args.db:
        _check_workspace(args.db, args.workspace, model_name, "lora" if lora is not None else "full")
    lm = load_model(model_name, device=str(accelerator.device), dtype=args.dtype, lora=lora)
    trainer = PolicyTrainer(lm)
    if args.init_checkpoint:
        load_into(trainer, args.init_checkpoint)
        init_version = trainer.version
    tok = lm.tokenizer

    rows = read_preferences(args.data, args.exclude_rationalised)
    data = [
        tokenize_pair(tok, row, args.max_prompt_tokens, args.max_completion_tokens, f"{args.data}: pair {i + 1}")
        for i, row in enumerate(rows)
    ]

    # reference scores, once: each process scores every num_processes-th pair, then all exchange
    started = time.perf_counter()
    mine = list(range(accelerator.process_index, len(data), accelerator.num_processes))
    ref_local: list[tuple[int, float, float]] = []
    with lm.reference() as ref_model:
        ref_model.train(False)
        for s in range(0, len(mine), args.batch_size):
            idx = mine[s : s + args.batch_size]
            batch = pair_batch([data[i] for i in idx], tok.pad_token_id, lm.device)
            scores = sequence_scores(batch_logps(ref_model, batch), batch["completion_mask"], args.loss_type)
            b = len(idx)
            ref_local += [(i, float(scores[j]), float(scores[b + j])) for j, i in enumerate(idx)]
    ref = {i: (c, r) for i, c, r in gather_object(ref_local)}
    if len(ref) != len(data):  # pragma: no cover - a gather bug, not a user error
        raise RuntimeError(f"reference scores for {len(ref)} of {len(data)} pairs")
    lm.drop_reference()  # the frozen copy is not needed any more
    ref_seconds = time.perf_counter() - started

    params = lm.trainable_parameters
    lr = args.lr if args.lr is not None else default_lr(lm)
    optimizer = trainer.optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = lr, args.weight_decay
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        list(range(len(data))), batch_size=args.batch_size, shuffle=True, collate_fn=list, generator=generator
    )
    model, optimizer, loader = accelerator.prepare(lm.model, optimizer, loader)

    metrics_file = open(args.metrics_out, "w", encoding="utf-8") if (args.metrics_out and main) else None
    steps = 0
    history = []
    model.train(True)
    try:
        for epoch in range(args.epochs):
            for idx in loader:
                idx = [int(i) for i in idx]
                # forward and backward through oneDNN on CPU where it wins (cpu_linear.py), as in the online update
                with accelerator.accumulate(model), onednn_linear(lm.model, enabled=accelerator.device.type == "cpu"):
                    batch = pair_batch([data[i] for i in idx], tok.pad_token_id, accelerator.device)
                    scores = sequence_scores(batch_logps(model, batch), batch["completion_mask"], args.loss_type)
                    b = len(idx)
                    ref_c = torch.tensor([ref[i][0] for i in idx], device=scores.device)
                    ref_r = torch.tensor([ref[i][1] for i in idx], device=scores.device)
                    losses, chosen_rewards, rejected_rewards = dpo_loss(
                        scores[:b], scores[b:], ref_c, ref_r,
                        beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                    )
                    loss = losses.mean()
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                steps += 1
                margin = (chosen_rewards - rejected_rewards).mean()
                accuracy = (chosen_rewards > rejected_rewards).float().mean()
                stats = accelerator.reduce(torch.stack([loss.detach().float(), margin.float(), accuracy.float()]), "mean")
                record = {
                    "epoch": epoch,
                    "step": steps,
                    "loss": float(stats[0]),
                    "rewards/margins": float(stats[1]),
                    "rewards/accuracies": float(stats[2]),
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                }
                history.append(record)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if main:
                    log.info("epoch %d step %d loss %.4f margin %.4f", epoch, steps, record["loss"], record["rewards/margins"])
    finally:
        if metrics_file is not None:
            metrics_file.close()
    model.train(False)

    # the checkpoint, in the app's format, written by the main process
    accelerator.wait_for_everyone()
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    full_state = accelerator.get_state_dict(model) if sharded else None  # every process must take part
    summary = {
        "pairs": len(data),
        "processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "epochs": args.epochs,
        "steps": steps,
        "version": init_version + steps,
        "reference_seconds": ref_seconds,
        "seconds": time.perf_counter() - started,
        "final": history[-1] if history else None,
        "out": str(Path(args.out).resolve()),
    }
    if main:
        if sharded:
            fresh = load_model(model_name, device="cpu", dtype=args.dtype, lora=lora)
            fresh.model.load_state_dict(full_state)
            saver = PolicyTrainer(fresh, version=init_version + steps)  # optimiser state stays sharded: not saved
        else:
            lm.model = accelerator.unwrap_model(model)
            saver = PolicyTrainer(lm, version=init_version + steps)
            saver.optimizer = getattr(optimizer, "optimizer", optimizer)
        extra = {
            "trained_offline": {
                "data": str(Path(args.data).resolve()),
                "algorithm": args.algorithm,
                "loss_type": args.loss_type,
                "beta": args.beta,
                "lr": lr,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "processes": accelerator.num_processes,
                "pairs": len(data),
                "steps": steps,
                "init_checkpoint": args.init_checkpoint,
            }
        }
        save_checkpoint(saver, args.out, extra)
        if args.db:
            from ..storage.store import Store

            store = Store(args.db)
            store.ensure_workspace(args.workspace)
            store.set_workspace_model(args.workspace, saver.lm.name, "lora" if saver.lm.lora is not None else "full")
            store.record_checkpoint(args.workspace, saver.version, args.out, kind="train", extra=extra["trained_offline"])
            store.close()
    accelerator.wait_for_everyone()
    return summary


def main(argv: list[str] | None = None) -> int:
    """Train from the command line ``argv``; the main process prints the summary as JSON. Returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        summary = train(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary and summary.get("out"):
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
