"""The fault matrix at random moments: kill -9, run the same command again, count the runs that end identical.

For each fault (:data:`rsitr_cli.faults.FAULTS`: during a training epoch, during validation, while
writing a checkpoint, during pretraining, during feature extraction) an uninterrupted run of its
command (:func:`rsitr_cli.faults.scenarios`, on a synthetic dataset made here) counts the
fault's moments; then, ``--tries`` times, a fresh run is killed (SIGKILL) at a moment drawn
uniformly from them with ``--seed``, the same command is run again, and the try counts as
survived when that rerun exits 0, its compared files (weights, resume state, metrics, or the
feature cache) are bit-identical to the uninterrupted run's, and no partial file is left. With
``--kills K`` each try is killed K times before the final rerun (each kill's moment counted from
the start of that run, which resumes the one before; a moment past what is left lets it finish).

    python benchmarks/faults.py [--tries 2] [--kills 1] [--seed 0] [--faults training,validation,...] [--work DIR]

The defaults take a few minutes on two cores (every run is a fresh interpreter on one thread).
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

from rsitr.data.synth import generate_synthetic
from rsitr.progress import progress_bar
from rsitr_cli import faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=2, help="tries per fault (default 2)")
    parser.add_argument("--kills", type=int, default=1, help="kills per try before the final rerun (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the moments drawn")
    parser.add_argument("--faults", default=",".join(faults.FAULTS), help="comma-separated faults")
    parser.add_argument("--work", help="folder for the runs (default: a temporary folder, removed)")
    args = parser.parse_args()
    chosen = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in faults.FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(faults.FAULTS)}")
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rsitr-faults-"))
    try:
        generate_synthetic(work / "data", num_images=36, image_size=64, seed=3)
        dataset, cache = work / "data" / "dataset_synth.json", work / "training-cache"
        references: dict[str, tuple[faults.Scenario, dict[str, int]]] = {}
        for name in sorted({faults.SCENARIO_OF[f] for f in chosen}):
            scenario = faults.scenarios(dataset, work / "reference", cache)[name]
            references[name] = (scenario, faults.reference_run(scenario, work / f"{name}-moments.json"))
        rng = random.Random(args.seed)
        tries: dict[str, list[tuple[str, list[str]]]] = {fault: [] for fault in chosen}  # (moments drawn, problems)
        plan = [(fault, t) for fault in chosen for t in range(args.tries)]
        for fault, t in progress_bar(plan, desc="kill, rerun, compare", unit="try"):
            reference, counts = references[faults.SCENARIO_OF[fault]]
            moments = [rng.randint(1, counts[fault]) for _ in range(args.kills)]
            scenario = faults.scenarios(dataset, work / f"{fault}-{t}", cache)[faults.SCENARIO_OF[fault]]
            found, _ = faults.kill_then_rerun(reference, scenario, fault, moments)
            tries[fault].append(("+".join(map(str, moments)), found))
            shutil.rmtree(scenario.out.parent, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("| fault | moments | killed at | survived | first problems |")
    print("|---|---|---|---|---|")
    for fault, done in tries.items():
        count = references[faults.SCENARIO_OF[fault]][1][fault]
        survived = sum(not found for _, found in done)
        problems = "; ".join(problem for _, found in done for problem in found[:2]) or "-"
        print(f"| {fault}: {faults.FAULTS[fault].moment} | {count} | {', '.join(m for m, _ in done)} "
              f"| {survived}/{len(done)} | {problems} |")
    total = sum(not found for done in tries.values() for _, found in done)
    print(f"\n{total}/{len(plan)} tries survived (seed {args.seed}, {args.kills} kill(s) per try) "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
