"""Run benchmarks and write their results to ``benchmarks/results/<name>.json``.

    python -m benchmarks                 # every quick benchmark
    python -m benchmarks NAME [NAME...]  # chosen ones (module benchmarks/bench_NAME.py)
    python -m benchmarks --list

Each ``bench_*.py`` module defines ``run() -> dict`` and may set ``QUICK = False`` when it
takes long (the quality runs); those run only when named.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def available() -> dict[str, object]:
    modules = {}
    for path in sorted(HERE.glob("bench_*.py")):
        name = path.stem.removeprefix("bench_")
        modules[name] = importlib.import_module(f"benchmarks.{path.stem}")
    return modules


def machine() -> dict[str, object]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("names", nargs="*")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    modules = available()
    if args.list:
        for name, module in modules.items():
            kind = "quick" if getattr(module, "QUICK", True) else "long"
            print(f"{name:30s} {kind:5s} {(module.__doc__ or '').strip().splitlines()[0]}")
        return 0
    unknown = [n for n in args.names if n not in modules]
    if unknown:
        print(f"error: no benchmark {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = args.names or [n for n, m in modules.items() if getattr(m, "QUICK", True)]
    RESULTS.mkdir(exist_ok=True)
    for name in chosen:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        result = modules[name].run()
        record = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M"),
                  "wall_s": round(time.perf_counter() - started, 1), "machine": machine(),
                  "result": result}
        path = RESULTS / f"{name}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"-> {path.relative_to(HERE.parent)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
