"""Command line: ``python -m rlhf_core <command>``.

Commands: ``simulate`` (the headless loop), ``diagnose`` (un-hinted acceptance per
case), ``export`` / ``import`` (rankings
out of and into the database), ``evaluate`` (held-out A/B of reference vs
policy), ``workspaces`` (list or create) and ``train`` (offline DPO on an
export; for several processes use ``accelerate launch -m rlhf_core.training.train``).
``--db`` defaults to the app's database: ``$RLHF_DB``, else
``$RLHF_DATA_DIR/rlhf.sqlite``, else ``data/rlhf.sqlite`` in the repository.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .model.models import DEFAULT_MODEL, REGISTRY, ModelUnavailableError


def _fmt(value) -> str:
    """A metric that may be None (a skipped step has no finite loss)."""
    return "n/a" if value is None else f"{value:.4f}"


def _default_db() -> str:
    from .storage.store import default_db_path

    return str(default_db_path())


def _simulate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .simulate import SimulationSettings, run_simulation

    from .evaluate import split_cases

    cases = _load_cases(args.cases)
    if args.split != "all":
        train, heldout = split_cases(cases, args.heldout_fraction, args.split_seed)
        cases = train if args.split == "train" else heldout
        if not cases:
            raise ValueError(f"the {args.split} split of these {len(train) + len(heldout)} cases is empty")
    engine = Engine(
        args.model, lora=args.lora, device=args.device, dtype=args.dtype,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints or None,
    )
    if not args.no_db:
        # without --workspace: "default", or one named after the model and mode when
        # "default" already holds another model's policy
        engine.attach_store(args.db, args.workspace, preferred="default")
    conclusion = engine.workspaces.conclusion_mode(args.conclusion)
    settings = SimulationSettings(
        algorithm=args.algorithm, updates=args.updates, traces=args.traces,
        max_new_tokens=args.max_new_tokens, seed=args.seed, budget=args.budget,
        steps=args.steps, lr=args.lr, conclusion=conclusion, negatives=args.negatives,
        autopilot=args.autopilot,
    )
    resumed = False
    if not engine.store.is_temporary:
        info = engine.resume_info
        resumed = info["updates"] > 0
        print(
            f"database {engine.store.path}, workspace {engine.workspace!r}: version {info['version']}, "
            f"{info['updates']} update(s) and {info['rankings']} ranking(s) so far"
            + (f", resumed from {info['checkpoint']}" if info["checkpoint"] else "")
            + (f", replayed {info['replayed']} ranking(s)" if info["replayed"] else ""),
            file=sys.stderr,
        )
    if args.checkpoint_dir:
        engine.save(f"{args.checkpoint_dir}/initial")
    with open(args.out, "a" if resumed else "w", encoding="utf-8") as out:
        def write(metrics: dict) -> None:
            out.write(json.dumps(metrics) + "\n")
            out.flush()
            print(
                f"update {metrics['update']}: {metrics['case_id']} loss={_fmt(metrics['loss'])} "
                f"kl={_fmt(metrics['kl'])} accept={metrics['acceptance_rate']:.2f} version={metrics['version']} "
                f"({metrics['seconds']:.1f}s update, {metrics['generation_seconds']:.1f}s sampling)",
                file=sys.stderr,
            )

        run_simulation(engine, settings, cases=cases, on_update=write, annotator=args.annotator)
    if args.checkpoint_dir:
        engine.save(f"{args.checkpoint_dir}/final")
    return 0


def _open_store(path: str, must_exist: bool = True):
    from .storage.store import Store

    if must_exist and not Path(path).is_file():
        raise ValueError(f"database not found: {path}")
    return Store(path)


def _export(args: argparse.Namespace) -> int:
    from .storage.export import export

    store = _open_store(args.db)
    n = export(store, args.format, args.out, workspace=args.workspace, exclude_rationalised=args.exclude_rationalised)
    print(f"wrote {n} row(s) to {args.out}", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    from .storage.importer import import_file

    store = _open_store(args.db, must_exist=False)
    counts = import_file(store, args.file, workspace=args.workspace, annotator=args.annotator)
    print(json.dumps(counts))
    return 0


def _load_cases(path: str | None):
    from .clinical.cases import load_cases, load_library
    from .library import library_or_builtin

    if path is None:
        return library_or_builtin()
    p = Path(path)
    if p.is_dir():
        return load_library(p)
    if not p.is_file():
        raise ValueError(f"cases not found: {path}")
    return load_cases(p)


def _evaluate(args: argparse.Namespace) -> int:
    from .training.checkpoint import load_into, read_manifest
    from .engine import lora_from_checkpoint
    from .evaluate import compare_policies, format_table, split_cases, write_json
    from .model.models import LoraSettings, load_model
    from .training.update import PolicyTrainer

    checkpoint = args.checkpoint
    note = ""
    if checkpoint is None and args.db and Path(args.db).is_file():
        from .storage.store import Store

        store = Store(args.db, readonly=True)
        if store.workspace(args.workspace) is not None:
            latest = store.latest_checkpoint(args.workspace)
            if latest is not None and latest["path"] is not None:
                checkpoint = latest["path"]
                note = f" (latest checkpoint of workspace {args.workspace!r} in {args.db})"
        store.close()
    if checkpoint is not None:
        manifest = read_manifest(checkpoint)
        model = args.model or manifest["base_model"]
        lora = lora_from_checkpoint(checkpoint)
    else:
        model = args.model or DEFAULT_MODEL
        lora = LoraSettings() if args.lora else None
        print("no checkpoint: the policy is the reference, so both arms sample the same model", file=sys.stderr)
    lm = load_model(model, device=args.device, dtype=args.dtype, lora=lora)
    trainer = PolicyTrainer(lm)
    if checkpoint is not None:
        load_into(trainer, checkpoint)
        print(f"policy: {checkpoint}{note}, version {trainer.version}", file=sys.stderr)
    cases = _load_cases(args.cases)
    if args.heldout_only:
        _, cases = split_cases(cases, args.heldout_fraction, args.split_seed)
    if args.max_cases:
        cases = cases[: args.max_cases]

    class _Policy:  # what compare_policies reads from an engine
        def __init__(self, trainer):
            self.lm, self.version, self.lock = trainer.lm, trainer.version, None

    def progress(p: dict) -> None:
        print(f"  {p['done']}/{p['total']} {p['case_id']} ({p['arm']})", file=sys.stderr)

    result = compare_policies(
        _Policy(trainer), cases, args.samples, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
        on_progress=progress,
    )
    result["checkpoint"] = checkpoint
    print(format_table(result))
    if args.json_out:
        write_json(result, args.json_out)
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from .diagnose import diagnose, format_report, write_report
    from .rollout.generation import SamplingConfig
    from .model.models import load_model

    cases = _load_cases(args.cases)
    if args.max_cases:
        cases = cases[: args.max_cases]
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, conclusion=args.conclusion,
        conclusion_score=args.conclusion_score, conclusion_draw=args.conclusion_draw,
    )

    def progress(row: dict) -> None:
        print(f"  {row['case_id']}: {row['accepted']}/{row['sampled']} accepted", file=sys.stderr)

    report = diagnose(lm, cases, samples=args.samples, sampling=sampling, seed=args.seed, on_case=progress,
                      with_traces=args.with_traces)
    print(format_report(report, per_case=not args.summary))
    if args.json_out:
        write_report(report, args.json_out)
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


def _workspaces(args: argparse.Namespace) -> int:
    store = _open_store(args.db, must_exist=args.create is None)
    if args.create:
        store.create_workspace(args.create)
        print(f"created workspace {args.create!r}", file=sys.stderr)
    rows = store.workspaces()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'workspace':<24} {'model':<20} {'mode':<5} {'rankings':>8} {'updates':>8} {'version':>8}")
        for w in rows:
            print(
                f"{w['name']:<24} {w['model'] or '-':<20} {w['mode'] or '-':<5} {w['rankings']:>8} "
                f"{w['updates']:>8} {w['checkpoint_version'] if w['checkpoint_version'] is not None else '-':>8}"
            )
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training.train import main as train_main

    return train_main(args.train_args)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m rlhf_core`` parser: one subcommand per action, each with its handler as ``func``."""
    parser = argparse.ArgumentParser(prog="python -m rlhf_core", description="RLHF control room engine")
    sub = parser.add_subparsers(dest="command", required=True)
    default_db = _default_db()

    from .rollout.conclusion import CANDIDATE_SCORES, CONCLUSION_DRAWS, CONCLUSION_MODES
    from .rollout.generation import SamplingConfig
    from .training.bounds import help_text

    sim = sub.add_parser("simulate", help="generate -> rank (scripted) -> update, without a browser")
    sim.add_argument("--model", default=DEFAULT_MODEL, help=f"one of {', '.join(REGISTRY)}, a hub id or a local folder")
    sim.add_argument("--algorithm", choices=["dpo", "grpo"], default="dpo")
    sim.add_argument("--updates", type=int, default=3, help="updates to run in this invocation")
    sim.add_argument("--traces", type=int, default=4, help="traces ranked per update (K)")
    sim.add_argument("--max-new-tokens", type=int, default=128)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--budget", type=int, default=8, help="un-hinted samples per case before rationalising")
    sim.add_argument("--steps", type=int, default=2, help="optimisation steps per ranking")
    sim.add_argument("--negatives", type=int, default=4,
                     help="rejected traces ranked below the line, under every accepted one (0: none)")
    sim.add_argument("--lr", type=float, default=None)
    sim.add_argument("--out", default="metrics.jsonl", help="metrics JSONL (appended to when the run resumes)")
    sim.add_argument("--checkpoint-dir", default=None, help="also save initial/ and final/ checkpoints here")
    sim.add_argument("--db", default=default_db, help=f"database to record into and resume from (default {default_db})")
    sim.add_argument("--no-db", action="store_true", help="record nothing (no resume)")
    sim.add_argument(
        "--workspace", default=None,
        help="default: 'default', or a workspace named after the model and mode when 'default' holds another model's policy",
    )
    sim.add_argument("--cases", default=None, help="case file or folder (default: the bundled library)")
    sim.add_argument(
        "--split", choices=["train", "heldout", "all"], default="train",
        help="which cases to teach: the training split (default; held-out cases stay untouched for evaluate), the held-out split, or all",
    )
    sim.add_argument("--heldout-fraction", type=float, default=0.2, help="as in evaluate")
    sim.add_argument("--split-seed", type=int, default=0, help="as in evaluate")
    sim.add_argument(
        "--conclusion", choices=list(CONCLUSION_MODES), default=None,
        help="constrained: the model's own probabilities pick the conclusion among the case's candidates; "
        "free: it writes its own (default: the workspace's setting, else constrained; a choice is saved to the workspace)",
    )
    sim.add_argument("--checkpoint-every", type=int, default=1, help="save a checkpoint every N updates")
    sim.add_argument("--keep-checkpoints", type=int, default=3, help="automatic checkpoints kept (0: all)")
    sim.add_argument("--annotator", default="simulated-clinician")
    sim.add_argument("--autopilot", action="store_true",
                     help="rank with the workspace's reward model (fitted on its clinicians' rankings; verified traces "
                     "first) instead of the scripted clinician; recorded as source 'autopilot'")
    mode = sim.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_const", const=True, default="auto",
                      help="train a LoRA adapter (default on CPU for models of 100M+ parameters)")
    mode.add_argument("--full", dest="lora", action="store_const", const=False,
                      help="train every weight (default on a GPU and for small models)")
    sim.add_argument("--device", default=None)
    sim.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    sim.set_defaults(func=_simulate)

    from .storage.export import FORMATS

    exp = sub.add_parser("export", help="write rankings as TRL preference pairs, full rankings or agreement")
    exp.add_argument("--db", default=default_db)
    exp.add_argument("--format", choices=list(FORMATS), default="trl")
    exp.add_argument("--out", required=True)
    exp.add_argument("--workspace", default=None, help="only this workspace (default: all)")
    exp.add_argument("--exclude-rationalised", action="store_true", help="leave out traces sampled with the answer as a hint")
    exp.set_defaults(func=_export)

    imp = sub.add_parser("import", help="read a rankings export or a TRL pair file into a workspace")
    imp.add_argument("file")
    imp.add_argument("--db", default=default_db)
    imp.add_argument("--workspace", default="default")
    imp.add_argument("--annotator", default=None, help="annotator for every imported row (default: the row's own, else import:<file>)")
    imp.set_defaults(func=_import)

    ev = sub.add_parser("evaluate", help="held-out A/B: verifier acceptance and safety, reference vs policy")
    ev.add_argument("--model", default=None, help=f"base model (default: the checkpoint's, else {DEFAULT_MODEL})")
    ev.add_argument("--checkpoint", default=None, help="policy checkpoint (default: the workspace's latest in --db)")
    ev.add_argument("--cases", default=None, help="case file or folder (default: the bundled library)")
    ev.add_argument("--samples", type=int, default=8, help="traces per case and arm")
    ev.add_argument("--heldout-only", action="store_true", help="only the held-out split of the cases")
    ev.add_argument("--heldout-fraction", type=float, default=0.2)
    ev.add_argument("--split-seed", type=int, default=0)
    ev.add_argument("--max-cases", type=int, default=None)
    ev.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens)
    ev.add_argument("--temperature", type=float, default=0.8)
    ev.add_argument("--top-p", type=float, default=0.95)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--db", default=default_db)
    ev.add_argument("--workspace", default="default")
    ev.add_argument("--json-out", default=None)
    ev.add_argument("--lora", action="store_true", help="without a checkpoint: load the model with a (fresh) adapter")
    ev.add_argument("--device", default=None)
    ev.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ev.set_defaults(func=_evaluate)

    dg = sub.add_parser("diagnose", help="un-hinted acceptance and the verifier's rejection reasons, per case and overall")
    dg.add_argument("--model", default=DEFAULT_MODEL, help=f"one of {', '.join(REGISTRY)}, a hub id or a local folder")
    dg.add_argument("--cases", default=None, help="case file or folder (default: the bundled library)")
    dg.add_argument("--samples", type=int, default=8, help="un-hinted traces per case")
    dg.add_argument("--max-cases", type=int, default=None)
    dg.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens)
    dg.add_argument("--temperature", type=float, default=SamplingConfig.temperature)
    dg.add_argument("--top-p", type=float, default=SamplingConfig.top_p)
    dg.add_argument("--seed", type=int, default=1)
    dg.add_argument("--conclusion", choices=list(CONCLUSION_MODES), default=CONCLUSION_MODES[0])
    dg.add_argument("--conclusion-score", choices=list(CANDIDATE_SCORES), default=SamplingConfig.conclusion_score,
                    help="how candidates are scored in the constrained mode")
    dg.add_argument("--conclusion-draw", choices=list(CONCLUSION_DRAWS), default=SamplingConfig.conclusion_draw,
                    help=help_text(SamplingConfig, "conclusion_draw"))
    dg.add_argument("--summary", action="store_true", help="print the totals only")
    dg.add_argument("--with-traces", action="store_true", help="keep every trace (text, tokens, verdict) in the JSON")
    dg.add_argument("--json-out", default=None, help="also write the whole report as JSON")
    dg.add_argument("--device", default=None)
    dg.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    dg.set_defaults(func=_diagnose)

    ws = sub.add_parser("workspaces", help="list (or create) workspaces")
    ws.add_argument("--db", default=default_db)
    ws.add_argument("--create", default=None, metavar="NAME")
    ws.add_argument("--json", action="store_true")
    ws.set_defaults(func=_workspaces)

    tr = sub.add_parser(
        "train", help="offline DPO on an export, one process (see: accelerate launch -m rlhf_core.training.train --help)",
        add_help=False,
    )
    tr.add_argument("train_args", nargs=argparse.REMAINDER)
    tr.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); returns the exit status (2 after an error)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser, so `train --help` and every option pass through
        from .training.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelUnavailableError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
