"""Shared pieces of the benchmarks: problem settings, timing, peak memory, machine description, tables and JSON."""

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20

# Every attention, MLP and norm output of a timm ViT (Raghu et al. 2021, Figure 1), plus the MLP hidden layer and the
# block outputs: 6 per block, 72 for 12 blocks.
MANY_LAYERS = ["**.norm1", "**.attn", "**.norm2", "**.mlp", "**.mlp.fc1", "blocks.*"]


@dataclass(frozen=True)
class Setting:
    """The models and images of the floor and peer benchmarks."""

    vit: str
    img_size: int
    resnet: str
    num_images: int
    batch_size: int


SETTINGS = {
    "cpu": Setting("vit_tiny_patch16_224", 96, "resnet18", 256, 64),
    "gpu": Setting("vit_base_patch16_224", 224, "resnet50", 1024, 256),
}

# A workload is built untimed (models copied, hooks installed, ...) and returns the call that is timed.
Workload = Callable[[], Callable[[], object]]


def build_models(setting: Setting, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Randomly initialized ViT and ResNet in eval mode; the same weights in every process (seeded)."""
    torch.manual_seed(0)
    vit = timm.create_model(setting.vit, img_size=setting.img_size)
    resnet = timm.create_model(setting.resnet)
    return vit.to(device).eval(), resnet.to(device).eval()


def random_images(num_images: int, img_size: int, device: torch.device) -> Tensor:
    """The same normal-noise images in every process."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(num_images, 3, img_size, img_size, generator=generator).to(device)


# ------------------------------------------------------------------------------------------------------ command line


def parser(description: str, repeats: int = 5) -> argparse.ArgumentParser:
    """The flags every benchmark takes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--preset", choices=["cpu", "gpu"], help="problem sizes (see docs/performance.md); default: gpu on cuda"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help="repeats: timed ones after one warm-up round, or memory measurements",
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's); 1 on a machine shared with other work"
    )
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/<device>/<benchmark>.json)")
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed flags with ``device`` as a ``torch.device``, the preset resolved and the load average noted."""
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False.")
    args.preset = args.preset or ("gpu" if args.device.type == "cuda" else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load_before = os.getloadavg()
    return args


# ------------------------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so that a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The clocks every timing records. "cpu" is the CPU time of the calling thread (time.thread_time): with one torch
# thread all of torch's CPU work runs on it, and time the other jobs of a shared machine take from it does not count,
# so it is the clock to compare on a busy CPU. "wall" (time.perf_counter) is what a user waits, load included; on
# CUDA it is the only meaningful one (the thread waits for the GPU without using CPU time).
CLOCKS = ("cpu", "wall")


def timed(call: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Seconds of one call on each clock of ``CLOCKS``."""
    synchronize(device)
    start_wall, start_cpu = time.perf_counter(), time.thread_time()
    call()
    synchronize(device)
    return {"cpu": time.thread_time() - start_cpu, "wall": time.perf_counter() - start_wall}


def primary_clock(device: torch.device) -> str:
    """The clock the ratios and targets are read on: thread CPU time on the CPU, wall time on CUDA."""
    return "wall" if device.type == "cuda" else "cpu"


def time_interleaved(
    workloads: dict[str, Workload], repeats: int, device: torch.device
) -> tuple[dict[str, dict[str, list[float]]], dict[str, str]]:
    """Seconds of every workload per round on each clock (``times[name][clock]``), and the error of each that failed.

    The workloads alternate within every round, so slow drifts (other processes on a shared machine, clock changes)
    hit all of them alike and ratios taken within a round stay meaningful when absolute times move. An untimed
    warm-up round comes first (oneDNN / cuDNN kernel selection, allocator growth, lazy imports). A workload that
    raises (a peer crashing or running out of memory) is recorded, keeps no times and is not run again.
    """
    times: dict[str, dict[str, list[float]]] = {name: {clock: [] for clock in CLOCKS} for name in workloads}
    failures: dict[str, str] = {}
    for round_index in range(repeats + 1):
        for name, workload in workloads.items():
            if name in failures:
                continue
            try:
                seconds = timed(workload(), device)
            except Exception as err:  # a failing peer is a result to report, not a reason to stop
                first_line = str(err).split("\n", 1)[0][:200]
                failures[name] = f"{type(err).__name__}: {first_line}"
                times[name] = {clock: [] for clock in CLOCKS}  # a workload that failed in any round counts as failed
                release_memory(device)
                continue
            release_memory(device)  # peers leave reference cycles (hooks holding their own object) behind
            if round_index > 0:
                for clock in CLOCKS:
                    times[name][clock].append(seconds[clock])
    return times, failures


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, extremes and all values of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """Summary of the ratios of two workloads' times taken within the same rounds."""
    return summary([a / b for a, b in zip(numerator, denominator, strict=True)])


def release_memory(device: torch.device) -> None:
    """Free garbage and cached CUDA blocks, so that the next measurement starts from the same state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------------ memory

# glibc keeps freed heap blocks resident and hands them out again without the resident set moving, which would hide
# later peaks. With fixed low thresholds every block above 128 KiB is mmap-ed and unmapped on free, so the resident
# set follows the memory that is live. Set only in the measuring processes: it slows allocation down.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

MEMORY_METHOD = {
    "cpu": "peak resident set size (VmHWM, reset via /proc/self/clear_refs) minus the resident set before the "
    "measured call, in a fresh process per measurement with MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=131072, "
    "after one warm-up call on separately built models",
    "cuda": "torch.cuda.max_memory_allocated minus torch.cuda.memory_allocated before the measured call, after one "
    "warm-up call on separately built models",
}


def peak_memory(task: Callable[..., Callable[[], object]], *args: Any, device: torch.device) -> int:
    """Peak bytes a workload holds above what was held before it started (models and inputs are held before).

    ``task(*args)`` builds models and inputs and returns the call to measure. It is built twice: the first call warms
    up (kernel selection, thread pools), the second, freshly built (so that nothing the first left behind counts as
    held before), is measured. On CUDA this is ``max_memory_allocated`` (tensors) in this process. On the CPU torch
    keeps no allocator statistics, so it is the kernel's exact peak resident set size (not a sampled one) of a fresh
    process with malloc settings that return freed memory (see ``MEMORY_METHOD``); ``task`` must then be a
    module-level function.
    """
    if device.type == "cuda":
        release_memory(device)
        try:
            return _measure_peak(task, args, device)
        finally:
            release_memory(device)
    with _environment(_MALLOC_ENV), ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measure_peak, task, args, device, torch.get_num_threads()).result()


def _measure_peak(
    task: Callable[..., Callable[[], object]], args: tuple, device: torch.device, threads: int | None = None
) -> int:
    if threads:
        torch.set_num_threads(threads)
    task(*args)()
    call = task(*args)
    release_memory(device)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    Path("/proc/self/clear_refs").write_text("5")  # sets VmHWM to the current resident set
    before = _proc_status_kib("VmRSS")
    call()
    return (_proc_status_kib("VmHWM") - before) * 1024


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------------------------------------- machine


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text()

    def field(name: str) -> str:
        found = re.search(rf"^{name}\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
        return found.group(1).strip() if found else "unknown"

    meminfo = Path("/proc/meminfo").read_text()
    info: dict[str, Any] = {
        "cpu": field("model name"),
        "cpu_family_model_stepping": f"{field('cpu family')}/{field('model')}/{field('stepping')}",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def describe(device: torch.device) -> str:
    """One line naming the machine, for the top of a table."""
    info = machine(device)
    text = f"{info['cpu']} ({info['usable_cpus']} CPUs, {info['torch_threads']} torch threads)"
    if "gpu" in info:
        text += f", {info['gpu']}"
    return f"{text}, torch {info['torch']}, load average before: {os.getloadavg()[0]:.2f}"


# ---------------------------------------------------------------------------------------------------------- results


def save(name: str, args: argparse.Namespace, rows: list[dict[str, Any]], **extra: Any) -> Path:
    """Write the rows, the settings and the machine to JSON; return the path."""
    path = args.out or RESULTS / args.device.type / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "load_before")}
    record = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args.device),
        # Other processes on a small shared machine slow everything down; the load average says how busy it was.
        "load_average_before": args.load_before,
        "load_average_after": os.getloadavg(),
        "settings": settings,
        **extra,
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Setting):
        return asdict(value)
    if hasattr(value, "tolist"):  # NumPy arrays and scalars
        return value.tolist()
    return str(value)


def print_table(title: str, rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """A Markdown table; ``columns`` are ``(header, key, format spec)``, missing values print as ``-``."""
    cells = [[_cell(row.get(key), spec) for _, key, spec in columns] for row in rows]
    headers = [header for header, _, _ in columns]
    widths = [max(len(text) for text in column) for column in zip(headers, *cells, strict=True)]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in cells:
        print("| " + " | ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)) + " |")


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)
