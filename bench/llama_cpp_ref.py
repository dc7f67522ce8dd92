"""llama.cpp's decoding speed on a GGUF file, as a reference point for bench.generate.

    python -m bench.llama_cpp_ref MODEL.gguf PROMPT_IDS_JSON N_TOKENS REPEATS

Prints tokens/s of one stream of N_TOKENS sampled tokens (median of REPEATS).
Run as its own process by bench.generate: a llama.cpp build for the wrong CPU
dies of an illegal instruction, which must not take the benchmark with it.
"""
from __future__ import annotations

import json
import statistics
import sys
import time


def main(argv=None) -> float:
    path, prompt_json, n, repeats = argv or sys.argv[1:]
    prompt, n, repeats = json.loads(prompt_json), int(n), int(repeats)
    from llama_cpp import Llama

    import torch

    llm = Llama(model_path=path, n_ctx=len(prompt) + n + 8, n_threads=torch.get_num_threads(), seed=0, verbose=False)

    def one_stream() -> float:
        started, produced = time.perf_counter(), 0
        for _ in llm.generate(prompt, temp=0.8, top_p=0.95, reset=True):
            produced += 1  # EOS is not checked: exactly n tokens, like the other measurements
            if produced == n:
                break
        return n / (time.perf_counter() - started)

    one_stream()  # warm-up
    rate = statistics.median(one_stream() for _ in range(repeats))
    print(json.dumps(rate))
    return rate


if __name__ == "__main__":
    main()
