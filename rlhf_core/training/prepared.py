"""The first optimisation step of a DPO update, prepared while the clinician reads.

DPO's loss reads each trace only through its sequence log-prob s_i (the masked sum of
its per-token log-probs; their mean for IPO), so by the chain rule its gradient is

    grad L = sum_i (dL/ds_i) grad s_i

and the ranking only chooses the weights dL/ds_i. ``grad s_i`` and the per-token
log-probs depend on the weights and the trace alone, so ``PreparedGradients.prepare``
computes them one trace at a time while the cards are read. The first step at *Submit*
then runs no forward or backward for a prepared trace: its log-probs enter the loss as a
leaf tensor (``first_step_logps``), whose gradient gives dL/ds_i, and its parameter
gradient is added with that weight (``add_prepared_gradients``). Traces not prepared
(yet) run through the model in one batch as before, so a *Submit* that comes early loses
nothing. The step is the same arithmetic in another order (parameters after it agree to
float32 rounding, tested). GRPO's loss weighs each token differently (importance ratio,
KL term), so it always runs the plain step.

A prepared gradient holds only for the weights it was computed on: each set is stamped
with the trainable parameters' identities and in-place version counters, which every
optimiser step, load and reset bumps. Only adapters are prepared: with full fine-tuning
one trace's gradient is the size of the model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from ..model.cpu_linear import onednn_linear
from ..model.models import LoadedModel
from ..rollout.logprobs import CompletionBatch, collate, completion_logps
from ..rollout.records import Trace

# Objectives whose loss depends on each trace only through its sequence log-prob.
SEQUENCE_LEVEL = {"dpo"}
MAX_PREPARED_BYTES = 1 << 30  # per batch; LoRA r=16 on SmolLM2 takes ~20 MB per trace


@dataclass
class PreparedTrace:
    """One trace's first-step inputs under the stamped weights."""

    logps: torch.Tensor  # [T] per-token log-probs, 0 where the loss mask is 0
    grads: list[torch.Tensor]  # gradient of logps.sum() for each trainable parameter


def trace_key(trace: Trace) -> tuple:
    """What identifies a trace's tokens (prompt, completion, loss mask)."""
    return tuple(trace.prompt_ids), tuple(trace.completion_ids), tuple(trace.loss_mask or ())


def weights_stamp(params: list[torch.Tensor]) -> tuple:
    """Changes whenever a parameter is replaced or modified in place."""
    return tuple((id(p), p._version) for p in params)


class PreparedGradients:
    """Per-trace log-probs and gradients of one batch, for the weights they were computed on."""

    def __init__(self) -> None:
        self._stamp: tuple | None = None
        self._traces: dict[tuple, PreparedTrace] = {}

    def clear(self) -> None:
        """Forget everything prepared."""
        self._stamp, self._traces = None, {}

    def __len__(self) -> int:
        return len(self._traces)

    def keep_only(self, traces: list[Trace]) -> None:
        """Forget what was prepared for traces other than these (an earlier batch)."""
        keys = {trace_key(t) for t in traces}
        self._traces = {k: v for k, v in self._traces.items() if k in keys}

    def prepare(self, lm: LoadedModel, trace: Trace) -> bool:
        """Compute ``trace``'s log-probs and gradient under the current weights (kept until
        the weights change or another prompt's trace is prepared). False when it is not
        worth keeping: full fine-tuning, or no room left under MAX_PREPARED_BYTES."""
        if lm.lora is None or not trace.completion_ids:
            return False
        params = lm.trainable_parameters
        stamp, key = weights_stamp(params), trace_key(trace)
        if stamp != self._stamp or any(k[0] != key[0] for k in self._traces):
            self._stamp, self._traces = stamp, {}
        if key in self._traces:
            return True
        size = sum(p.numel() * p.element_size() for p in params)
        if size * (len(self._traces) + 1) > MAX_PREPARED_BYTES:
            return False
        batch = collate(trace.prompt_ids, [trace.completion_ids], lm.tokenizer.pad_token_id, lm.device,
                        loss_masks=[trace.loss_mask])
        was_training = lm.model.training
        lm.model.train(True)  # as the update runs it
        try:
            with torch.enable_grad(), onednn_linear(lm.model, enabled=lm.device.type == "cpu"):
                logps = completion_logps(lm.model, batch)[0]
                grads = torch.autograd.grad(logps.sum(), params, allow_unused=True)
        finally:
            lm.model.train(was_training)
        self._traces[key] = PreparedTrace(
            logps.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        return True

    def take(self, params: list[torch.Tensor], traces: list[Trace]) -> list[PreparedTrace | None]:
        """The prepared entry of each of ``traces`` (None where there is none), if the
        weights are still the ones they were computed on; everything is forgotten."""
        found = [None] * len(traces)
        if self._traces and weights_stamp(params) == self._stamp:
            found = [self._traces.get(trace_key(t)) for t in traces]
        self.clear()
        return found


def prepare_in_turns(trainer, lock: ContextManager, traces: list[Trace],
                     should_stop: Callable[[], bool] = lambda: False) -> int:
    """``trainer.prepare`` each of ``traces`` (a ``PolicyTrainer``; what an earlier batch left
    is dropped), meant for while the clinician reads: one trace per hold of ``lock`` (the
    engine's), so a generation or update asked for meanwhile waits for one trace at most.
    Stops when ``should_stop()`` or when nothing is kept (full fine-tuning). Returns how many
    traces are ready."""
    with lock:
        trainer.prepared.keep_only(traces)
    ready = 0
    for trace in traces:
        if should_stop():
            break
        with lock:
            if not trainer.prepare(trace):
                break
        ready += 1
        time.sleep(0.001)  # a thread waiting for the lock takes it before the next trace
    return ready


def _rows(batch: CompletionBatch, rows: list[int]) -> CompletionBatch:
    index = torch.tensor(rows, device=batch.input_ids.device)
    return CompletionBatch(batch.input_ids[index], batch.attention_mask[index], batch.completion_ids[index],
                           batch.completion_mask[index], batch.prompt_len)


def policy_logps(batch: CompletionBatch, prepared: list[PreparedTrace | None], forward,
                 params: list[torch.Tensor]) -> tuple[torch.Tensor, Callable[[], None]]:
    """[K, T] log-probs for an optimisation step, and what to call after its backward.
    Rows with a ``prepared`` entry come from a leaf tensor, whose gradient the call turns
    into parameter gradients (``add_prepared_gradients``); the others from
    ``forward(sub_batch)`` in one batch (none when every row is prepared)."""
    k, t = batch.completion_ids.shape
    ready = [i for i in range(k) if i < len(prepared) and prepared[i] is not None]
    if not ready:
        return forward(batch), lambda: None
    missing = [i for i in range(k) if i not in ready]
    leaf = torch.zeros((len(ready), t), dtype=torch.float32, device=batch.completion_ids.device)
    for row, i in enumerate(ready):
        leaf[row, : prepared[i].logps.shape[0]] = prepared[i].logps
    leaf.requires_grad_(True)
    parts = [leaf] + ([forward(_rows(batch, missing))] if missing else [])
    order = torch.argsort(torch.tensor(ready + missing, device=leaf.device))
    mask = batch.completion_mask[ready]
    return torch.cat(parts)[order], lambda: add_prepared_gradients(params, leaf, [prepared[i] for i in ready], mask)


def add_prepared_gradients(params: list[torch.Tensor], leaf: torch.Tensor, prepared: list[PreparedTrace],
                           mask: torch.Tensor) -> None:
    """Add sum_i (dL/ds_i) grad s_i to the parameters' ``.grad``; dL/ds_i is read off
    ``leaf.grad`` [P, T], constant along each row's counted tokens (``mask`` [P, T])
    for a loss of the sequence log-probs (a per-token weighting is refused)."""
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    counted = mask.sum(-1)
    weights = (grad * mask).sum(-1) / counted.clamp(min=1)  # [P]; IPO: (dL/d mean) / n_i, as grad s_i is of the sum
    spread = ((grad - weights.unsqueeze(-1)).abs() * mask).amax() if grad.numel() else torch.tensor(0.0)
    if float(spread) > 1e-6 * (float(weights.abs().max()) if weights.numel() else 0.0) + 1e-12:
        raise RuntimeError("the loss weighs a prepared trace's tokens unequally: it cannot use prepared gradients")
    weights = weights.tolist()
    for j, p in enumerate(params):
        total = torch.zeros_like(p)
        for w, entry in zip(weights, prepared):
            total.add_(entry.grads[j], alpha=w)
        if p.grad is None:
            p.grad = total
        else:
            p.grad.add_(total)
