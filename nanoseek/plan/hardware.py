"""Accelerator presets (dense peak FLOP/s, memory, bandwidth, an assumed hourly price) and token-count parsing.

Peaks are dense (no sparsity) vendor figures; prices are assumptions a user overrides with `--price`
(the $2 per H800-hour is the rental price DeepSeek-V3's report uses for its cost figure)."""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, replace

import torch

from nanoseek.errors import NanoseekError
from nanoseek.train.objective import peak_flops


class PlanError(NanoseekError):
    """A plan that cannot be made: an unknown accelerator, a layout that cannot exist, a malformed count."""


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    fp8_flops: float | None  # dense peak, FLOP/s; None where the chip has no fp8 matmul
    memory_bytes: float
    bandwidth: float  # bytes/s of device memory
    price_per_hour: float  # assumed $ per device-hour

    def peak(self, precision: str) -> float:
        if precision == "fp8":
            if self.fp8_flops is None:
                raise PlanError(f"{self.name} has no fp8 matmul; use --precision bf16")
            return self.fp8_flops
        return self.bf16_flops

    def with_price(self, price: float | None) -> Accelerator:
        return self if price is None else replace(self, price_per_hour=price)


GB = 1e9
ACCELERATORS: dict[str, Accelerator] = {
    "h800": Accelerator("H800", 989e12, 1979e12, 80 * GB, 3.35e12, 2.0),
    "h100": Accelerator("H100 SXM", 989e12, 1979e12, 80 * GB, 3.35e12, 2.5),
    "h200": Accelerator("H200", 989e12, 1979e12, 141 * GB, 4.8e12, 3.5),
    "b200": Accelerator("B200", 2250e12, 4500e12, 192 * GB, 8.0e12, 5.0),
    "a100": Accelerator("A100 80GB", 312e12, None, 80 * GB, 2.0e12, 1.5),
    "mi300x": Accelerator("MI300X", 1307e12, 2615e12, 192 * GB, 5.3e12, 2.5),
}


def copy_bandwidth(nbytes: int = 1 << 27, repeats: int = 5) -> float:
    """Bytes moved (read + written) per second by a large tensor copy: this machine's streaming bandwidth."""
    src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def this_cpu(bandwidth: float | None = None, memory_bytes: float | None = None) -> Accelerator:
    """This machine as measured: `train.objective.peak_flops` of the CPU (fp32, its threads) and a copy bandwidth."""
    peak = peak_flops(torch.device("cpu"), torch.float32)
    if peak is None:
        raise PlanError("cannot read this CPU's peak FLOP/s from /proc/cpuinfo")
    if memory_bytes is None:
        try:
            with open("/proc/meminfo") as f:
                memory_bytes = int(f.readline().split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            memory_bytes = 16 * GB
    return Accelerator("this CPU", peak, None, memory_bytes, bandwidth or copy_bandwidth(), 0.0)


def get_accelerator(name: str, price: float | None = None) -> Accelerator:
    key = name.lower()
    if key == "cpu":
        return this_cpu().with_price(price)
    if key not in ACCELERATORS:
        raise PlanError(f"unknown accelerator {name!r} (known: {', '.join(ACCELERATORS)}, cpu)")
    return ACCELERATORS[key].with_price(price)


_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str) -> float:
    """'14.8T', '500M', '2B', '1e9', '1_000_000' -> a number of tokens."""
    m = re.fullmatch(r"\s*([0-9_.]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise PlanError(f"cannot read {text!r} as a count (forms: 14.8T, 500M, 2B, 1e9)")
    try:
        value = float(m.group(1).replace("_", ""))
    except ValueError:
        raise PlanError(f"cannot read {text!r} as a count (forms: 14.8T, 500M, 2B, 1e9)") from None
    return value * _SUFFIX[m.group(2).upper()]


def human(n: float, unit: str = "") -> str:
    for suffix, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"
