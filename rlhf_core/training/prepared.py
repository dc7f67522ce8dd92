"""The first optimisation step of an update, prepared while the clinician reads.

By the chain rule an update's gradient is sum_t (dL/dlogp_t) grad logp_t over the ranked
traces' tokens, and at the first step the ranking enters only through dL/dlogp_t. For
each objective that upstream gradient lies, trace by trace, in the span of a few token
weightings v that do not depend on the ranking (its *bases*):

    DPO   dL/dlogp_t = a_i * m_t                  (the loss reads each trace through
                                                   its sequence log-prob s_i: v = m)
    GRPO  dL/dlogp_t = a_i * m_t r_t + c_i * m_t k_t   (unclipped, as every token is at
                                                   the first step: r_t = exp(logp_t - old_t)
                                                   the importance ratio, k_t = 1 - exp(ref_t - logp_t)
                                                   the k3 penalty's derivative)

with m the loss mask and a_i, c_i set by the ranking. ``PreparedGradients.prepare``
computes, one trace at a time while the cards are read, the trace's log-probs and the
gradient of sum_t v_t logp_t for each basis v. The first step at *Submit* then runs no
forward or backward for a prepared trace: its log-probs enter the loss as a leaf tensor
(``policy_logps``), the leaf's gradient is fitted by the bases (least squares, and the
fit must be exact to float32 rounding), and the coefficients weight the prepared
gradients (``add_prepared_gradients``). A row the bases do not fit (a GRPO token clipped
because the weights moved since sampling) runs its forward and backward then; traces
not prepared (yet) run through the model in one batch as before, so a *Submit* that
comes early loses nothing. The step is the same arithmetic in another order
(parameters after it agree to float32 rounding, tested).

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

MAX_PREPARED_BYTES = 1 << 30  # per batch; LoRA r=16 on SmolLM2 takes ~20 MB per trace and basis
BASES = {"dpo": ("mask",), "grpo": ("mask * ratio", "mask * k3 slope")}  # basis_weights' rows


def basis_weights(algorithm: str, logps: torch.Tensor, mask: torch.Tensor, old_logps: torch.Tensor,
                  ref_logps: torch.Tensor) -> torch.Tensor:
    """The token weightings whose span holds an objective's first-step upstream gradient
    for one trace (see the module docstring). GRPO: the derivative of its clipped surrogate
    with the k3 penalty (Eqs. 3-4 of https://arxiv.org/pdf/2402.03300) with respect to
    logp_t, inside the clip range: -A_i r_t + beta k3'(logp_t), over a per-trace normaliser.

    Args:
        logps, old_logps, ref_logps, mask: [T] the trace's log-probs under the policy now,
            the sampling policy and the reference; its 0/1 loss mask.
    Returns:
        [B, T] one row per basis: DPO the mask; GRPO mask * ratio and mask * k3'.
    """
    if algorithm == "dpo":
        return mask.unsqueeze(0)
    if algorithm == "grpo":
        ratio = torch.exp(logps - old_logps)  # d(ratio)/dlogp = ratio
        kl_slope = 1 - torch.exp(ref_logps - logps)  # d k3(logp, ref)/dlogp (losses.k3_kl)
        return torch.stack([mask * ratio, mask * kl_slope])
    raise ValueError(f"no prepared first step for algorithm {algorithm!r}")


@dataclass
class PreparedTrace:
    """One trace's first-step inputs under the stamped weights."""

    algorithm: str
    logps: torch.Tensor  # [T] per-token log-probs, 0 where the loss mask is 0
    bases: torch.Tensor  # [B, T] basis_weights
    grads: list[list[torch.Tensor]]  # per basis v: gradient of sum_t v_t logp_t for each trainable parameter


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

    def prepare(self, lm: LoadedModel, trace: Trace, algorithm: str = "dpo",
                should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Compute ``trace``'s log-probs and basis gradients for ``algorithm``'s first step under
        the current weights (kept until the weights change or another prompt's trace is
        prepared). False when it is not worth keeping: full fine-tuning, no room left under
        MAX_PREPARED_BYTES, (GRPO) a trace without its stored log-probs, or ``should_stop()``
        turned true between its passes (a *Submit* waits for one pass, not a whole trace)."""
        if lm.lora is None or not trace.completion_ids:
            return False
        n = len(trace.completion_ids)
        if algorithm == "grpo" and not len(trace.old_logps) == len(trace.ref_logps) == n:
            return False
        params = lm.trainable_parameters
        stamp, key = weights_stamp(params), trace_key(trace)
        if stamp != self._stamp or any(k[0] != key[0] for k in self._traces):
            self._stamp, self._traces = stamp, {}
        if key in self._traces and self._traces[key].algorithm == algorithm:
            return True
        size = sum(p.numel() * p.element_size() for p in params) * len(BASES[algorithm])
        if size * (len(self._traces) + 1) > MAX_PREPARED_BYTES:
            return False
        batch = collate(trace.prompt_ids, [trace.completion_ids], lm.tokenizer.pad_token_id, lm.device,
                        loss_masks=[trace.loss_mask])
        was_training = lm.model.training
        lm.model.train(True)  # as the update runs it
        try:
            with torch.enable_grad(), onednn_linear(lm.model, enabled=lm.device.type == "cpu"):
                logps = completion_logps(lm.model, batch)[0]
                # GRPO's bases read the stored log-probs (their lengths checked above); DPO's do not
                stored = ([torch.tensor(x, dtype=torch.float32, device=lm.device)
                           for x in (trace.old_logps, trace.ref_logps)] if algorithm == "grpo" else [logps.detach()] * 2)
                bases = basis_weights(algorithm, logps.detach(), batch.completion_mask[0], *stored)
                grads = []
                for b, v in enumerate(bases):
                    if should_stop():
                        return False
                    grads.append(torch.autograd.grad((logps * v).sum(), params, allow_unused=True,
                                                     retain_graph=b + 1 < len(bases)))
        finally:
            lm.model.train(was_training)
        self._traces[key] = PreparedTrace(algorithm, logps.detach(), bases, [
            [torch.zeros_like(p) if g is None else g for p, g in zip(params, per_basis)] for per_basis in grads])
        return True

    def take(self, params: list[torch.Tensor], traces: list[Trace], algorithm: str) -> list[PreparedTrace | None]:
        """The entry prepared for ``algorithm`` of each of ``traces`` (None where there is
        none), if the weights are still the ones they were computed on; everything is forgotten."""
        found = [None] * len(traces)
        if self._traces and weights_stamp(params) == self._stamp:
            found = [self._traces.get(trace_key(t)) for t in traces]
            found = [entry if entry is not None and entry.algorithm == algorithm else None for entry in found]
        self.clear()
        return found


def prepare_in_turns(trainer, lock: ContextManager, traces: list[Trace],
                     should_stop: Callable[[], bool] = lambda: False, algorithm: str = "dpo") -> int:
    """``trainer.prepare`` each of ``traces`` for ``algorithm`` (a ``PolicyTrainer``; what an earlier batch left
    is dropped), meant for while the clinician reads: one trace per hold of ``lock`` (the
    engine's), so other model work waits for one trace at most, and a caller that stops it
    (``should_stop``, checked between passes: a *Submit*, a new generation) one pass.
    Stops when ``should_stop()`` or when nothing is kept (full fine-tuning). Returns how many
    traces are ready."""
    with lock:
        trainer.prepared.keep_only(traces)
    ready = 0
    for trace in traces:
        if should_stop():
            break
        with lock:
            if not trainer.prepare(trace, algorithm, should_stop):
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

    def add() -> None:
        unfit = add_prepared_gradients(params, leaf, [prepared[i] for i in ready])
        if unfit:  # the upstream gradient of these rows is outside their bases: backward through the model
            rows = [ready[r] for r in unfit]
            grad = leaf.grad[unfit]
            torch.autograd.backward(forward(_rows(batch, rows)), grad_tensors=grad)

    return torch.cat(parts)[order], add


def fit_bases(grad: torch.Tensor, bases: torch.Tensor) -> torch.Tensor | None:
    """Coefficients c [B] with c @ bases == grad to float32 rounding, else None.

    Args: grad [T] a trace's upstream gradient; bases [B, T'] (T' <= T; grad is 0 beyond)."""
    n = bases.shape[1]
    g, v = grad[:n].double(), bases.double()
    coef = torch.linalg.pinv(v.T) @ g  # least squares; a basis that is all zeros gets 0
    scale = float(grad.abs().max()) if grad.numel() else 0.0
    residual = max(float((coef @ v - g).abs().max()), float(grad[n:].abs().max()) if grad.shape[0] > n else 0.0)
    return coef.float() if residual <= 1e-5 * scale + 1e-12 else None


def add_prepared_gradients(params: list[torch.Tensor], leaf: torch.Tensor, prepared: list[PreparedTrace]) -> list[int]:
    """Add each prepared row's sum_b c_b * (gradient of sum_t v_bt logp_t) to the parameters'
    ``.grad``, with c fitted to the row of ``leaf.grad`` [P, T] by its bases (``fit_bases``).
    Returns the rows the bases do not fit (nothing added for them)."""
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    terms, unfit = [], []
    for row, entry in enumerate(prepared):
        coef = fit_bases(grad[row], entry.bases)
        if coef is None:
            unfit.append(row)
        else:
            terms += [(float(c), basis_grads) for c, basis_grads in zip(coef.tolist(), entry.grads)]
    for j, p in enumerate(params):
        total = torch.zeros_like(p)
        for c, basis_grads in terms:
            total.add_(basis_grads[j], alpha=c)
        if p.grad is None:
            p.grad = total
        else:
            p.grad.add_(total)
    return unfit
