"""Time and peak RSS of SafeMERGE scoring and repair against the dense baseline and the I/O floor, same files.

Each repetition of a method runs in a fresh subprocess, so its peak RSS is its own (`os.wait4` returns the
child's `ru_maxrss`). The methods are:

    floor        read the target tensors of both checkpoints once with `safe_open` (`get_tensor` + `clone`), no math
    floor-reused the same reads, each copied into one reused buffer per shape instead of a new tensor
    ours-score   `safemerge_callback.repair.score_adapter` (streams V per module, never builds C)
    ours-repair  `safemerge_callback.repair.repair_adapter`, method linear, writing the repaired adapter
    dense        `dense_baseline.dense_scores` (both models in memory as float32, dense C per module)

The methods alternate inside each repetition, in an order rotated every repetition, so load from other processes
falls on all of them. The page cache cannot be dropped without root, so the checkpoint files are read once before
timing (warm) and every method is timed warm. Every worker imports the same modules before its clock starts.

Examples:

    python benchmarks/bench_repair.py --quick
    python benchmarks/bench_repair.py --data /tmp/safemerge-bench/llama2-7b-L8 --adapter r8-qv --repeats 3
    python benchmarks/bench_repair.py --data /tmp/safemerge-bench/llama2-7b-L32 --adapter r8-qv \\
        --methods floor ours-score ours-repair --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

METHODS = ("floor", "floor-reused", "ours-score", "ours-repair", "dense")
SCRIPT = Path(__file__).resolve()


class RssSampler(threading.Thread):
    """Poll `/proc/self/status` and keep the peak of `RssAnon` (heap) and `RssFile` (mapped files), in bytes."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval = interval
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.stopped = threading.Event()

    def sample(self) -> None:
        with open("/proc/self/status") as status:
            for line in status:
                field, _, value = line.partition(":")
                if field in self.peaks:
                    self.peaks[field] = max(self.peaks[field], int(value.split()[0]) * 1024)

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self.stopped.set()
        self.join()
        self.sample()
        return dict(self.peaks)


def target_modules(task_dir: Path) -> list[str]:
    """Return the module names of a PEFT adapter, in file order."""
    from safetensors import safe_open

    with safe_open(str(task_dir / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    return [key[len("base_model.model."):-len(".lora_A.weight")] for key in keys if key.endswith(".lora_A.weight")]


def target_weights(task_dir: Path, model_dirs: list[Path]) -> Iterator[tuple[Path, str]]:
    """Yield `(shard file, tensor key)` of every target weight, checkpoint by checkpoint, in adapter order."""
    modules = target_modules(task_dir)
    for model_dir in model_dirs:
        weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
        for name in modules:
            yield model_dir / weight_map[f"{name}.weight"], f"{name}.weight"


def read_floor(task_dir: Path, model_dirs: list[Path]) -> int:
    """Read every target weight of each checkpoint once into memory and return the bytes read.

    `get_tensor` only maps the file, so `clone` copies the bytes to make the read happen. Handles stay open until
    the end.
    """
    from safetensors import safe_open

    total = 0
    handles = {}
    for path, key in target_weights(task_dir, model_dirs):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt", device="cpu")
        tensor = handles[path].get_tensor(key).clone()
        total += tensor.numel() * tensor.element_size()
    return total


def read_floor_reused(task_dir: Path, model_dirs: list[Path]) -> int:
    """Read every target weight once into one reused buffer per shape and return the bytes read.

    glibc's malloc serves requests above its dynamic mmap threshold (at most 32 MiB on 64-bit Linux) with fresh
    pages, so every new 32 MiB Llama weight is faulted in page by page, which costs more than the copy. Reusing a
    buffer leaves only the copy out of the page cache: the tightest floor for a reader that keeps no weights.
    """
    from safetensors import safe_open

    total = 0
    buffers: dict[tuple[torch.Size, torch.dtype], torch.Tensor] = {}
    for path, key in target_weights(task_dir, model_dirs):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            stored = handle.get_tensor(key)
            shape_and_dtype = (stored.shape, stored.dtype)
            if shape_and_dtype not in buffers:
                buffers[shape_and_dtype] = torch.empty_like(stored)
            buffers[shape_and_dtype].copy_(stored)
        total += stored.numel() * stored.element_size()
    return total


def run_method(method: str, args: argparse.Namespace) -> dict:
    """Run one method in this process and return its timing and scores (the worker side)."""
    import dense_baseline

    import safemerge_callback
    from safemerge_callback.repair import repair_adapter, score_adapter

    paths = {"base_model": str(args.data / "base"), "aligned_model": str(args.data / "aligned")}
    task_dir = args.data / "adapters" / f"task-{args.adapter}"
    sampler = RssSampler()
    sampler.start()
    result: dict = {"method": method, "library": str(Path(safemerge_callback.__file__).parent)}
    start = time.perf_counter()
    if method == "floor":
        result["bytes_read"] = read_floor(task_dir, [args.data / "base", args.data / "aligned"])
    elif method == "floor-reused":
        result["bytes_read"] = read_floor_reused(task_dir, [args.data / "base", args.data / "aligned"])
    elif method == "ours-score":
        report = score_adapter(str(task_dir), progress=False, **paths)
        result["scores"] = {m.name: m.score for m in report.modules}
    elif method == "ours-repair":
        with tempfile.TemporaryDirectory(prefix="safemerge-bench-") as scratch:
            report = repair_adapter(str(task_dir), str(args.data / "adapters" / f"safety-{args.adapter}"),
                                    method="linear", output_dir=Path(scratch) / "repaired", progress=False,
                                    **paths)
            result["selected"] = len(report.selected_modules)
        result["scores"] = {m.name: m.score for m in report.modules}
    else:
        result["scores"] = dense_baseline.dense_scores(task_dir, args.data / "base", args.data / "aligned")
    result["seconds"] = time.perf_counter() - start
    result.update({f"peak_{key}": value for key, value in sampler.stop().items()})
    return result


def worker_command(method: str, args: argparse.Namespace, result_path: Path) -> list[str]:
    return [sys.executable, str(SCRIPT), "--worker", method, "--data", str(args.data), "--adapter", args.adapter,
            "--result", str(result_path)]


def spawn(method: str, args: argparse.Namespace) -> dict:
    """Run one method in a fresh subprocess and return its result with the child's own peak RSS."""
    with tempfile.TemporaryDirectory(prefix="safemerge-bench-") as scratch:
        result_path = Path(scratch) / "result.json"
        search_path = [str(SCRIPT.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(search_path)}
        process = subprocess.Popen(worker_command(method, args, result_path), env=environment)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"The {method} worker failed with exit code {process.returncode}; its output is above.")
        result = json.loads(result_path.read_text())
    result["peak_rss"] = usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
    return result


def warm_files(data: Path) -> int:
    """Read every file of both checkpoints once so all methods run with them in the page cache; return the bytes."""
    total = 0
    for path in sorted((data / "base").iterdir()) + sorted((data / "aligned").iterdir()):
        with open(path, "rb") as handle:
            while chunk := handle.read(64 << 20):
                total += len(chunk)
    return total


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Return per-method medians and minima, the ratios between methods and the score agreement."""
    summary: dict = {"methods": {}}
    for method, results in runs.items():
        seconds = [r["seconds"] for r in results]
        summary["methods"][method] = {
            "seconds": seconds, "median_s": statistics.median(seconds), "min_s": min(seconds),
            "peak_rss_gib": max(r["peak_rss"] for r in results) / 2**30,
            "peak_anon_gib": max(r["peak_RssAnon"] for r in results) / 2**30,
            "peak_file_gib": max(r["peak_RssFile"] for r in results) / 2**30,
        }
    medians = {m: s["median_s"] for m, s in summary["methods"].items()}
    ratios = {}
    for slow, fast in (("dense", "ours-score"), ("dense", "ours-repair"), ("ours-score", "floor"),
                       ("ours-repair", "floor"), ("ours-score", "floor-reused"), ("ours-repair", "floor-reused")):
        if slow in medians and fast in medians:
            ratios[f"{slow} / {fast}"] = medians[slow] / medians[fast]
    if "dense" in runs and "ours-score" in runs:
        rss = summary["methods"]
        ratios["peak RSS dense / ours-score"] = rss["dense"]["peak_rss_gib"] / rss["ours-score"]["peak_rss_gib"]
    summary["ratios"] = ratios
    summary["score_agreement"] = score_agreement(runs)
    return summary


def score_agreement(runs: dict[str, list[dict]]) -> dict:
    """Return the largest absolute score difference of our methods against the dense baseline.

    Without a dense run, `ours-repair` is compared with `ours-score`.
    """
    if "dense" in runs:
        pairs = [(method, "dense") for method in ("ours-score", "ours-repair") if method in runs]
    else:
        pairs = [("ours-repair", "ours-score")] if "ours-repair" in runs and "ours-score" in runs else []
    agreement = {}
    for method, against in pairs:
        ours, other = runs[method][0]["scores"], runs[against][0]["scores"]
        differences = [abs(ours[name] - other[name]) for name in ours
                       if ours[name] is not None and other.get(name) is not None]
        agreement[method] = {"modules": len(ours), "compared": len(differences),
                             "max_abs_diff": max(differences, default=float("nan")), "against": against}
    return agreement


def float64_check(data: Path, adapter: str, runs: dict[str, list[dict]], count: int) -> list[dict]:
    """Recompute in float64, factored and dense, the `count` modules where our scores and the dense ones differ most.

    This shows which side a disagreement comes from: float32 rounding in the factored form or in the dense one.
    """
    import dense_baseline

    from safemerge_callback.scoring import lora_alignment_score

    if count <= 0 or "dense" not in runs or "ours-score" not in runs:
        return []
    ours, dense = runs["ours-score"][0]["scores"], runs["dense"][0]["scores"]
    gaps = sorted((abs(ours[n] - dense[n]), n) for n in ours if ours[n] is not None and dense.get(n) is not None)
    factors, scaling = dense_baseline.load_lora_factors(data / "adapters" / f"task-{adapter}")
    checks = []
    for _, name in reversed(gaps[-count:]):
        delta = (single_tensor(data / "aligned", f"{name}.weight").to(torch.float64)
                 - single_tensor(data / "base", f"{name}.weight").to(torch.float64))
        lora_a, lora_b = (f.to(torch.float64) for f in factors[name])
        checks.append({"module": name, "ours": ours[name], "dense": dense[name],
                       "float64_factored": lora_alignment_score(delta, lora_a, lora_b).score,
                       "float64_dense": dense_baseline.dense_score(delta, scaling * lora_b @ lora_a)})
    return checks


def single_tensor(model_dir: Path, key: str) -> torch.Tensor:
    """Read one tensor of a sharded checkpoint."""
    from safetensors import safe_open

    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(model_dir / weight_map[key]), framework="pt") as handle:
        return handle.get_tensor(key).clone()


def print_summary(summary: dict, context: dict) -> None:
    print(f"\ndata: {context['data']}  adapter: task-{context['adapter']}  modules: {context['modules']}  "
          f"target bytes (both checkpoints): {context['target_bytes'] / 2**30:.2f} GiB  warm: {context['warm']}")
    print(f"{'method':<12} {'median s':>9} {'min s':>8} {'peak RSS GiB':>13} {'anon GiB':>9} {'file GiB':>9}  runs")
    for method, stats in summary["methods"].items():
        runs = ", ".join(f"{s:.2f}" for s in stats["seconds"])
        print(f"{method:<12} {stats['median_s']:>9.2f} {stats['min_s']:>8.2f} {stats['peak_rss_gib']:>13.2f} "
              f"{stats['peak_anon_gib']:>9.2f} {stats['peak_file_gib']:>9.2f}  [{runs}]")
    for name, ratio in summary["ratios"].items():
        print(f"ratio {name}: {ratio:.2f}")
    for method, agreement in summary["score_agreement"].items():
        print(f"score agreement {method} vs {agreement['against']}: max |Δρ| = {agreement['max_abs_diff']:.2e} "
              f"over {agreement['compared']} of {agreement['modules']} modules")
    for check in summary.get("float64_check", []):
        print(f"float64 check {check['module']}: ours {check['ours']:.7f}, dense {check['dense']:.7f}, float64 "
              f"factored {check['float64_factored']:.7f}, float64 dense {check['float64_dense']:.7f}")


def environment_facts() -> dict:
    """Return the date, CPU, memory, torch version and the library's git commit, for the results page."""
    import platform

    facts = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__,
             "python": platform.python_version(), "cpus": os.cpu_count()}
    with open("/proc/cpuinfo") as cpuinfo:
        facts["cpu"] = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    with open("/proc/meminfo") as meminfo:
        facts["memory_gib"] = round(int(meminfo.readline().split()[1]) / 2**20, 1)
    repository = SCRIPT.parent.parent
    for key, command in (("commit", ["git", "rev-parse", "--short", "HEAD"]),
                         ("uncommitted", ["git", "status", "--porcelain", "--", "safemerge_callback"])):
        completed = subprocess.run(command, cwd=repository, capture_output=True, text=True, check=False)
        facts[key] = completed.stdout.strip() if completed.returncode == 0 else None
    return facts


def benchmark(args: argparse.Namespace) -> dict:
    """Run every method `args.repeats` times, alternating, and return the runs, the summary and the context."""
    task_dir = args.data / "adapters" / f"task-{args.adapter}"
    modules = target_modules(task_dir)
    context = {"data": str(args.data), "adapter": args.adapter, "modules": len(modules), "warm": not args.cold,
               "config": json.loads((args.data / "base" / "config.json").read_text()),
               "environment": environment_facts()}
    if not args.cold:
        context["warmed_bytes"] = warm_files(args.data)
    runs: dict[str, list[dict]] = {method: [] for method in args.methods}
    for repetition in range(args.repeats):
        shift = repetition % len(args.methods)
        for method in args.methods[shift:] + args.methods[:shift]:
            result = spawn(method, args)
            print(f"repetition {repetition + 1}/{args.repeats} {method}: {result['seconds']:.2f} s, "
                  f"peak RSS {result['peak_rss'] / 2**30:.2f} GiB", flush=True)
            runs[method].append(result)
            if method == "floor":
                context["target_bytes"] = result["bytes_read"]
    context.setdefault("target_bytes", float("nan"))
    summary = summarise(runs)
    summary["float64_check"] = float64_check(args.data, args.adapter, runs, args.float64_check)
    print_summary(summary, context)
    return {"context": context, "summary": summary, "runs": runs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="directory written by make_checkpoints.py")
    parser.add_argument("--adapter", help="adapter suffix <rank>-<targets>, as in adapters/task-r8-qv and "
                        "adapters/safety-r8-qv (default: r8-qv)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--repeats", type=int, help="repetitions of every method (default: 3)")
    parser.add_argument("--float64-check", type=int, default=2,
                        help="recompute in float64 the N modules where ours and dense differ most (0 to skip)")
    parser.add_argument("--cold", action="store_true", help="skip reading the files once before timing")
    parser.add_argument("--json", type=Path, help="write the runs and the summary to this file")
    parser.add_argument("--quick", action="store_true",
                        help="generate small checkpoints in a temporary directory and run every method once")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.quick:
        overridden = [flag for flag, value in (("--data", args.data), ("--adapter", args.adapter),
                                               ("--repeats", args.repeats)) if value is not None]
        if overridden:
            parser.error(f"--quick generates its own small data and runs every method once, so it takes no "
                         f"{', '.join(overridden)}.")
    else:
        args.adapter = args.adapter or "r8-qv"
        args.repeats = 3 if args.repeats is None else args.repeats
        if args.repeats < 1:
            parser.error(f"--repeats must be at least 1, got {args.repeats}.")
        if args.data is None:
            parser.error("--data is required unless --quick is given (write the data with make_checkpoints.py).")
        check_data(parser, args.data, args.adapter)
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"The folder of --json {str(args.json)!r} does not exist; create it first.")
    return args


def check_data(parser: argparse.ArgumentParser, data: Path, adapter: str) -> None:
    """Exit with a usage error unless `data` is a make_checkpoints.py output that has the adapter pair `adapter`."""
    if not all((data / part).is_dir() for part in ("base", "aligned", "adapters")):
        parser.error(f"--data {str(data)!r} is not a make_checkpoints.py output (it needs base/, aligned/ and "
                     "adapters/). Write one with benchmarks/make_checkpoints.py.")
    available = sorted(path.name[len("task-"):] for path in (data / "adapters").glob("task-*"))
    if adapter not in available or not (data / "adapters" / f"safety-{adapter}").is_dir():
        parser.error(f"--data {str(data)!r} has no adapter pair task-{adapter}/safety-{adapter}; available "
                     f"suffixes: {available}. Generate others with make_checkpoints.py --ranks/--targets.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        args.result.write_text(json.dumps(run_method(args.worker, args)))
        return
    if not args.quick:
        output = benchmark(args)
    else:
        import make_checkpoints

        with tempfile.TemporaryDirectory(prefix="safemerge-bench-quick-") as scratch:
            args.data = make_checkpoints.generate(Path(scratch) / "small", "small", ranks=(8,), targets=("qv",))
            args.adapter, args.repeats = "r8-qv", 1
            output = benchmark(args)
        print("quick mode: tiny shapes and one repetition check that every method runs; its times and ratios "
              "mean nothing.")
    if args.json:
        args.json.write_text(json.dumps(output, indent=2) + "\n")


if __name__ == "__main__":
    main()
