"""Generation throughput: our batched sampler against plain `model.generate`.

    python -m bench.generate [--model smollm2-135m] [--k 4] [--tokens 160] [--repeats 3]

Both draw K traces of exactly --tokens new tokens (EOS is ignored so the work is
equal) from the same prompt; tokens/s counts all K rows.
"""
from __future__ import annotations

import argparse
import json

import torch

from rlhf_core.generation import SamplingConfig, sample_stream
from rlhf_core.models import load_model
from rlhf_core.prompts import build_messages, encode_prompt

from .common import BENCH_CASE, machine, median, save_json, timed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    lm = load_model(args.model)
    tok = lm.tokenizer
    prompt = encode_prompt(tok, build_messages(BENCH_CASE))
    k, n = args.k, args.tokens

    def plain_generate():
        ids = torch.tensor([prompt] * k, device=lm.device)
        with torch.no_grad():
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                    max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
        assert out.shape[1] - len(prompt) == n

    def ours():
        config = SamplingConfig(k=k, max_new_tokens=n, seed=0, stream_every=n + 1)
        for update in sample_stream(lm, BENCH_CASE, config, ignore_eos=True):
            pass
        assert all(len(t.completion_ids) == n for t in update.traces)

    base = timed(plain_generate, args.repeats)
    mine = timed(ours, args.repeats)
    result = {
        "benchmark": "generate", "model": args.model, "machine": machine(), "k": k, "new_tokens": n,
        "hf_generate_tok_s": k * n / median(base), "ours_tok_s": k * n / median(mine),
        "hf_generate_s": median(base), "ours_s": median(mine),
    }
    result["speedup"] = result["ours_tok_s"] / result["hf_generate_tok_s"]
    print(json.dumps(result, indent=2))
    save_json(result, args.json_out)
    return result


if __name__ == "__main__":
    from rlhf_core.allocator import use_preferred_allocator

    use_preferred_allocator()  # measure on the allocator the app runs on
    main()
