"""Update step: one DPO optimisation step on a K=4 ranking (6 pairs), ours
against TRL's DPOTrainer on the same 6 pairs, same tokens, float32, CPU.

    pip install -r bench/requirements.txt   # TRL, the anchor
    python -m bench.update [--model smollm2-135m] [--mode full|lora|both] [--repeats 3]

Both sides see identical token sequences: the completions are tokenised the
way TRL tokenises prompt + completion, and our traces carry those ids. TRL's
time is its training step alone (measured by a callback from step begin to
step end, excluding its set-up); ours is the whole `PolicyTrainer.update` call
(step plus the post-update KL pass), and also timed to the end of its optimiser
step (its ``on_step`` hook): the work TRL's step does. The first-step loss and log-probs are
compared to check both compute the same thing. TRL runs twice: with its
reference model in the step (default), and with ``precompute_ref_log_probs=True``
(its reference pass before training, closer to our stored reference log-probs).
Each update's FLOPs are set against the machine's measured GEMM rate (a
roofline fraction).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time

import torch

from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.rollout.teacher import score_completions

from rlhf_core.rollout.records import Trace
from rlhf_core.model.models import LoraSettings, load_model
from rlhf_core.rollout.prompts import build_messages
from rlhf_core.training.update import FULL_LR, DPOConfig, PolicyTrainer, lora_lr

from .common import BENCH_CASE, machine, median, save_json


def make_pairs(lm, k: int, tokens: int, seed: int):
    """K sampled completions, re-tokenised the TRL way; returns (prompt_text, texts, prompt_ids, completion_ids)."""
    traces = sample_traces(lm, BENCH_CASE, SamplingConfig(k=k, max_new_tokens=tokens, seed=seed, temperature=1.0), ignore_eos=True)
    tok = lm.tokenizer
    prompt_text = tok.apply_chat_template(build_messages(BENCH_CASE), add_generation_prompt=True, tokenize=False)
    texts = [t.text for t in traces]
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    completions = []
    for text in texts:
        full = tok(prompt_text + text + tok.eos_token, add_special_tokens=False)["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids, "prompt tokenisation diverged"
        completions.append(full[len(prompt_ids):])
    return prompt_text, texts, prompt_ids, completions


def ours_traces(lm, prompt_ids, completions):
    old, ref, _ = score_completions(lm, prompt_ids, completions)
    return [
        Trace(BENCH_CASE.id, list(prompt_ids), c, "", "eos", o, r, 0)
        for c, o, r in zip(completions, old, ref)
    ]


def run_ours(model_name: str, lora: bool, prompt_ids, completions, repeats: int, lr: float, checkpointed: bool):
    lm = load_model(model_name, device="cpu", dtype="float32", lora=lora)
    traces = ours_traces(lm, prompt_ids, completions)
    ranking = list(range(len(traces)))
    times, step_times, first = [], [], None
    for _ in range(repeats + 1):  # the first call warms up allocators
        lm.reset_to_reference()
        trainer = PolicyTrainer(lm)
        stepped = []  # on_step fires once the optimiser step is taken, before the post-update KL pass
        start = time.perf_counter()
        metrics = trainer.update(traces, ranking, DPOConfig(steps=1, lr=lr, checkpoint_activations=checkpointed),
                                 on_step=lambda _: stepped.append(time.perf_counter()))
        times.append(time.perf_counter() - start)
        step_times.append(stepped[-1] - start)
        first = first or metrics
    return times[1:], step_times[1:], first


def gemm_peak_gflops(repeats: int = 20) -> float:
    """The machine's float32 GEMM rate at the update's shapes: the best of SmolLM2's layer
    shapes at 640 rows, through oneDNN or MKL (the update routes each shape to one of
    them: ``cpu_linear.onednn_wins``)."""
    import torch.nn.functional as F

    from rlhf_core.model.cpu_linear import _linear_pointwise

    best = 0.0
    with torch.no_grad():
        for rows, out_f, in_f in ((640, 1536, 576), (640, 576, 1536), (640, 576, 576)):
            x, weight = torch.randn(rows, in_f), torch.randn(out_f, in_f)
            for gemm in (lambda: _linear_pointwise(x, weight, None), lambda: F.linear(x, weight)):
                for _ in range(3):
                    gemm()
                start = time.perf_counter()
                for _ in range(repeats):
                    gemm()
                seconds = (time.perf_counter() - start) / repeats
                best = max(best, 2 * rows * in_f * out_f / seconds / 1e9)
    return best


def parameter_counts(lm) -> tuple[int, int]:
    """(decoder-layer parameters, LM-head parameters) of a loaded model."""
    base = lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model
    return (sum(p.numel() for p in base.get_decoder().layers.parameters()),
            base.get_output_embeddings().weight.numel())


def step_gflop(layers: int, head: int, prompt_len: int, completion_lens: list[int], lora: bool,
               checkpointed: bool, adapted: float = 1.0) -> float:
    """Approximate float32 FLOPs of one ``PolicyTrainer.update`` step plus its KL pass, in
    GFLOP, for ``layers`` decoder-layer and ``head`` LM-head parameters: 2 per parameter
    per token forward (decoder layers at every position, the LM head at completion
    positions), backward 2x the forward for full fine-tuning (weight and input gradients),
    1x with LoRA (input gradients; the adapters' own are negligible) through the ``adapted``
    share of the layers and the head (none reaches the frozen layers under the lowest
    adapter), one more forward of those with activation checkpointing (recomputed in
    backward), and the post-update KL pass (one forward of them: the frozen layers' output
    is replayed, ``frozen_prefix.py``)."""
    tokens, completion = prompt_len + sum(completion_lens), sum(completion_lens)
    forward = 2 * (layers * tokens + head * completion)
    trained = forward if not lora else 2 * (adapted * layers * tokens + head * completion)
    backward = trained * (1 if lora else 2)
    step = forward + backward + (trained if checkpointed else 0)
    return (step + trained) / 1e9


def run_trl(model_name: str, lora: bool, prompt_text, texts, repeats: int, lr: float, precompute: bool = False):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    rows = [{"prompt": prompt_text, "chosen": texts[a], "rejected": texts[b]} for a, b in itertools.combinations(range(len(texts)), 2)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.logs = [], []

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    times, logs = [], None
    for _ in range(repeats + 1):
        # TRL gets what it expects: a separate, resident reference model
        lm = load_model(model_name, device="cpu", dtype="float32", park_reference=False)
        peft_config = None
        ref_model = lm._reference
        if lora:
            from rlhf_core.model.lora import peft_config as lora_peft_config

            peft_config, ref_model = lora_peft_config(LoraSettings(), lm.model), None
        timer = StepTimer()
        with tempfile.TemporaryDirectory() as out:
            args = TRLConfig(
                output_dir=out, per_device_train_batch_size=len(rows), max_steps=1, learning_rate=lr,
                beta=0.1, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
                use_cpu=True, max_length=None, dataloader_num_workers=0, disable_tqdm=True,
                precompute_ref_log_probs=precompute,  # True: reference log-probs before training, as we store ours
            )
            trainer = DPOTrainer(
                model=lm.model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                processing_class=lm.tokenizer, peft_config=peft_config, callbacks=[timer],
            )
            trainer.train()
        times.append(timer.times[0])
        logs = logs or timer.logs[0]
    return times[1:], logs


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mode", choices=["full", "lora", "both"], default="both")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    lm = load_model(args.model, device="cpu", dtype="float32")
    prompt_text, texts, prompt_ids, completions = make_pairs(lm, args.k, args.tokens, seed=0)
    peak = gemm_peak_gflops()
    results = []
    for mode in (["full", "lora"] if args.mode == "both" else [args.mode]):
        lora = mode == "lora"
        lr = lora_lr(LoraSettings()) if lora else FULL_LR
        # like TRL's default, no activation checkpointing; the checkpointed (low-memory) run is reported beside it
        ours_t, ours_step_t, ours_m = run_ours(args.model, lora, prompt_ids, completions, args.repeats, lr,
                                               checkpointed=False)
        ours_ck_t, _, _ = run_ours(args.model, lora, prompt_ids, completions, args.repeats, lr, checkpointed=True)
        trl_t, trl_m = run_trl(args.model, lora, prompt_text, texts, args.repeats, lr)
        trl_pre_t, _ = run_trl(args.model, lora, prompt_text, texts, args.repeats, lr, precompute=True)
        layer_params, head_params = parameter_counts(lm)
        adapted = LoraSettings().adapted_layers if lora else 1.0
        gflop = step_gflop(layer_params, head_params, len(prompt_ids), [len(c) for c in completions], lora,
                           checkpointed=False, adapted=adapted)
        row = {
            "benchmark": "update", "mode": mode, "model": args.model, "machine": machine(),
            "pairs": math.comb(args.k, 2), "prompt_tokens": len(prompt_ids),
            "completion_tokens": [len(c) for c in completions],
            "trl_step_s": median(trl_t), "ours_update_s": median(ours_t),
            "speedup": median(trl_t) / median(ours_t),
            "ours_checkpointed_update_s": median(ours_ck_t), "speedup_checkpointed": median(trl_t) / median(ours_ck_t),
            "trl_precomputed_step_s": median(trl_pre_t), "speedup_vs_precomputed": median(trl_pre_t) / median(ours_t),
            # the work TRL's timed step does: ours up to its optimiser step, without the post-update KL pass
            "ours_step_s": median(ours_step_t), "step_speedup_vs_precomputed": median(trl_pre_t) / median(ours_step_t),
            "adapted_layers": adapted, "update_gflop": gflop, "gemm_peak_gflops": peak, "layer_params": layer_params, "head_params": head_params,
            "roofline_fraction": gflop / median(ours_t) / peak,
            "loss_ours": ours_m["loss"], "loss_trl": trl_m.get("loss"),
            "logps_chosen_ours": ours_m["logps/chosen"], "logps_chosen_trl": trl_m.get("logps/chosen"),
        }
        results.append(row)
        print(json.dumps(row, indent=2), flush=True)
    save_json(results, args.json_out)
    return results


if __name__ == "__main__":
    from rlhf_core.model.allocator import use_preferred_allocator

    use_preferred_allocator()  # measure on the allocator the app runs on
    main()
