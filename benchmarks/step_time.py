"""Training-step time of dense, checkpointing and actprune configurations, interleaved.

`actprune bench memory` times each configuration in its own block of steps; on a shared 2-core VM
the machine's speed drifts between blocks (dense ResMLP-S24 steps measured 12.9–17.7 s in
different runs). Here every round runs one step of each configuration in turn, so drift hits all
of them alike, and the ratios are medians over rounds of the per-round ratio to dense. With
--compile the eager configurations run first, then the compiled ones (each compiled row's ratio
is to compiled dense), and the table is rewritten after every round, so a run stopped by a time
limit (benchmarks/gpu.sh) keeps what it measured; the configurations are warmed up (compiled) one
at a time after dense, the default next, each followed by a round of those ready, so a limit
reached while a later one compiles keeps the ratios of those before it (and each row says how
long its warm-up took). Each row also gives the median time until the
step's last call returned, before the device finished: on a GPU, a step whose host time is near
its step time is limited by launching, not by the device's work.

python benchmarks/step_time.py --model resmlp_s24 --batch-size 32 --rounds 5
python benchmarks/step_time.py --model resmlp_tiny --image-size 28 --batch-size 128 --rounds 40
python benchmarks/step_time.py --frontier --rounds 3     # every configuration of the frontier
python benchmarks/step_time.py --model resmlp_tiny --image-size 28 --batch-size 128 --compile
python benchmarks/step_time.py --model hf:gpt2 --seq-len 1024 --batch-size 8 --amp bf16 \
    --configs dense checkpoint actprune_all_u4_b32 actprune_global_s0.5_b32 --compile --device cuda

With --frontier the JSON is also what `actprune plan --step-times` reads (its packaged default,
src/actprune/step_times.json, is a copy of one such run).
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from actprune import PruneConfig
from actprune.bench import device_name, save_results
from actprune.methods import MemoryConfig, apply_method, frontier_methods
from actprune.workloads import build_workload, language_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="resmlp_s24",
                        help="a zoo name, timm:NAME or hf:TYPE[:key=value,...]")  # fmt: skip
    parser.add_argument("--image-size", type=int, default=None, help="image models (default 224)")
    parser.add_argument("--seq-len", type=int, default=None, help="language models")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frontier", action="store_true",
                        help="every frontier configuration (methods.frontier_methods)")  # fmt: skip
    parser.add_argument("--configs", nargs="+", metavar="NAME",
                        help="only these configurations (names as in the table)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="also every configuration under torch.compile (ratios to compiled "
                        "dense)")  # fmt: skip
    parser.add_argument("--amp", choices=["none", "bf16"], default="none",
                        help="autocast dtype of the forward")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    if args.image_size is None and not language_model(args.model):
        args.image_size = 224
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    torch.manual_seed(0)
    language = language_model(args.model)
    configs = frontier_methods(language=language) if args.frontier else [
        MemoryConfig.dense(),
        MemoryConfig.actprune(PruneConfig.preset("recommended")),  # compiled next after dense
        MemoryConfig.checkpointing(),
        MemoryConfig.actprune(PruneConfig.preset("blocks")),
        MemoryConfig.actprune(PruneConfig.preset("paper")),
        *([MemoryConfig.actprune(PruneConfig.preset("transformer"))] if language else []),
    ]  # fmt: skip
    if args.configs:
        configs = [c for c in configs if c.name in args.configs or c.name == "dense"]
    work = build_workload(args.model, args.image_size, args.seq_len)  # the loss and the batch
    batch = work.batch(args.batch_size, args.device)
    amp = torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.amp == "bf16")

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[float, float]:
        """Seconds of one training step, and until its last call returned (on a GPU, the host's
        share: near the step's time when launching is what limits it)."""
        sync()
        start = time.perf_counter()
        with amp:
            loss = work.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        host = time.perf_counter() - start
        sync()
        return time.perf_counter() - start, host

    modes = (False, True) if args.compile else (False,)
    command = "python benchmarks/step_time.py " + shlex.join(argv if argv else sys.argv[1:])
    times: dict[str, list[float]] = {}
    hosts: dict[str, list[float]] = {}  # seconds until the step's last call returned
    ratios: dict[str, list[float]] = {}  # each step / the same round's dense step
    warm: dict[str, float] = {}  # seconds of the warm-up steps (compilation included)
    failed: dict[str, str] = {}  # configuration: its error (the others still run)
    md = ""

    def timed_round(runs: list, label: str) -> str:
        """One step of each of ``runs`` in turn (dense first), saved at once."""
        for name, model, opt in runs:
            seconds, host = step(model, opt)
            times.setdefault(name, []).append(seconds)
            hosts.setdefault(name, []).append(host)
            ratios.setdefault(name, []).append(seconds / times[runs[0][0]][-1])
        latest = ", ".join(f"{name} {times[name][-1]:.3f}s" for name, _, _ in runs)
        print(f"{label}: {latest}", file=sys.stderr, flush=True)
        return _save(args, command, work.size, times, hosts, ratios, warm, failed)

    for compiled in modes:  # eager first: a run cut short by a time limit keeps its eager rows
        runs = []  # timing only: each model has its own random initialisation
        for config in configs:
            fresh = build_workload(args.model, args.image_size, args.seq_len).model
            model = apply_method(fresh, config).to(args.device)
            name = config.name + (" (compiled)" if compiled else "")
            run = torch.compile(model) if compiled else model
            runs.append((name, run, torch.optim.AdamW(model.parameters())))
        base = "dense (compiled)" if compiled else "dense"
        ready = []  # warmed up, dense first
        for name, model, opt in runs:  # warm-up: optimizer state, compilation, allocator
            started = time.perf_counter()
            try:
                for _ in range(2 if compiled else 1):
                    step(model, opt)
            except Exception as error:  # a device run is scarce: report it and go on
                failed[name] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                print(f"FAILED: {name}: {failed[name]}", file=sys.stderr, flush=True)
                continue
            warm[name] = time.perf_counter() - started
            print(f"warm: {name} ({warm[name]:.1f} s)", file=sys.stderr, flush=True)
            ready.append((name, model, opt))
            if len(ready) > 1 and ready[0][0] == base:
                # a round as soon as a configuration is ready: a time limit reached while later
                # ones compile keeps the ratios of those before
                md = timed_round(ready, f"warm-up round ({name} ready)")
        if base in failed:  # no ratios in this mode
            if not compiled:
                raise SystemExit(f"dense failed, no ratios: {failed['dense']}")
            for name, _, _ in runs:
                failed.setdefault(name, "dense (compiled) failed")
        runs = [run for run in runs if run[0] not in failed]
        for r in range(args.rounds):
            md = timed_round(runs, f"round {r + 1}/{args.rounds}")
        del runs, ready, model, opt  # free this mode's models before the next mode's are built
    print(md)
    return 0


def _save(
    args: argparse.Namespace, command: str, size: int, times: dict, hosts: dict, ratios: dict,
    warm: dict, failed: dict,
) -> str:
    """Write the table and JSON of the rounds so far (each mode's ratios to its own dense)."""
    rows = [{"config": name, "median_s": statistics.median(t),
             "ratio": statistics.median(ratios[name]),
             "host_median_s": statistics.median(hosts[name]), "rounds": len(t),
             "warm_s": warm[name]} for name, t in times.items()]  # fmt: skip
    which = "step_time_frontier" if args.frontier else "step_time"
    which += "_compiled" if args.compile else ""
    kind = args.device.split(":")[0]
    shape = f"{args.image_size}px" if args.image_size else f"seq{size}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model)
    stem = f"{which}_{name}_{shape}_b{args.batch_size}_{kind}"
    stem += "_bf16" if args.amp != "none" else ""
    head = (
        f"# Step time, interleaved: {args.model} at {shape}, batch "
        f"{args.batch_size}, on {device_name(args.device)}\n\ntorch {torch.__version__}, "
        f"{args.rounds} rounds, AdamW, autocast {args.amp}. Command: `{command.strip()}`\n\n"
        "The eager configurations are timed first, then the compiled ones; within each, every "
        "round runs one step of each configuration in turn, and ratio = median over rounds of "
        "step / the same round's dense step (compiled rows: compiled dense's). Each "
        "configuration is warmed up (compiled) in turn after dense, and a round of those ready "
        "so far follows each, so rows have different round counts. The files are rewritten "
        "after every round (a run cut short keeps the rounds it finished). Host s: until the "
        "step's last call returned, before the device finished (on a GPU, near the step's "
        "time when launching limits it; on the CPU the step's time). Warm s: the warm-up "
        "steps (one eager, two compiled), compilation included.\n\n"
        "| config | median step s | × dense | host s | rounds | warm s |\n"
        "|---|---|---|---|---|---|\n"
    )
    table = [f"| {r['config']} | {r['median_s']:.3f} | {r['ratio']:.3f} | "
             f"{r['host_median_s']:.3f} | {r['rounds']} | {r['warm_s']:.1f} |\n"
             for r in rows]  # fmt: skip
    table += [f"| {name} | failed: {error} | | | | |\n" for name, error in failed.items()]
    md = head + "".join(table)
    setup = {"model": args.model, "image_size": args.image_size, "seq_len": args.seq_len,
             "batch": args.batch_size, "amp": args.amp,
             "device_name": device_name(args.device)}  # fmt: skip
    payload = {"command": command.strip(), "torch": torch.__version__, **setup, "rows": rows,
               "times": times, "host_times": hosts, "ratios": ratios,
               "failed": failed}  # fmt: skip
    save_results(args.out, stem, md, payload)
    return md


if __name__ == "__main__":
    raise SystemExit(main())
