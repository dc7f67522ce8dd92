"""Rankings for the reward-model benchmark: the scripted clinician ranks K fresh traces per case.

    python -m bench.reward_collect [--rankings 120] [--k 4] [--db runs/reward-bench.sqlite]

Samples K un-hinted traces per ranking from the default model (the app's
sampling defaults, constrained conclusion, reference policy: no updates),
verifies and safety-checks them, ranks them with ``simulate.scripted_ranking``
(verified first, then safer, then shorter) and records every ranking in a
store, with the traces' reference features, as the app would. Cases cycle
through the library's training split. Resumable: rankings already in the
database are kept and counted.
"""
from __future__ import annotations

import argparse
import json
import time

from rlhf_core.clinical.cases import default_cases_dir, load_library
from rlhf_core.evaluate import split_cases
from rlhf_core.rollout.generation import SamplingConfig, sample_traces
from rlhf_core.model.models import load_model
from rlhf_core.rollout.sampler import annotate
from rlhf_core.simulate import scripted_ranking
from rlhf_core.storage.store import Store

WORKSPACE = "reward-bench"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rankings", type=int, default=120)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens)
    parser.add_argument("--db", default="runs/reward-bench.sqlite")
    args = parser.parse_args(argv)
    store = Store(args.db)
    store.ensure_workspace(WORKSPACE)
    lm = load_model(args.model, device="cpu", dtype="float32")
    train = split_cases(load_library(default_cases_dir()))[0]
    done = store.count("rankings", WORKSPACE)
    started = time.perf_counter()
    for n in range(done, args.rankings):
        case = train[n % len(train)]
        config = SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, seed=1000 + n)
        traces = [annotate(t, case) for t in sample_traces(lm, case, config, reference_is_policy=True)]
        order = scripted_ranking(traces)
        store.record_ranking(WORKSPACE, traces, order, "scripted clinician", case=case, policy_version=0)
        print(json.dumps({"ranking": n + 1, "case": case.id, "verified": sum(bool(t.verdict["accepted"]) for t in traces),
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
