"""DeviceFingerprint: what a latency table was measured on, so a search can tell when it is stale.

Only things that change latency are compared (:meth:`DeviceFingerprint.mismatches`); library versions
that do not run the graph (torch, onnx) are recorded for the record but not compared. No hostname or
user name is stored: tables are shared files.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from hwprune.errors import HwpruneError
from hwprune.latency.pages import page_mode

__all__ = ["DeviceFingerprint"]

# (field, label) of what is compared; order is the order warnings are listed in
_COMPARED = (
    ("cpu", "cpu model"),
    ("cpu_id", "cpu family/model/stepping"),
    ("gpu", "gpu"),
    ("logical_cores", "logical cores"),
    ("physical_cores", "physical cores"),
    ("threads", "threads"),
    ("runtime", "runtime"),
    ("runtime_version", "runtime version"),
    ("batch", "batch"),
    ("seq", "sequence length"),
    ("dtype", "dtype"),
    ("pages", "memory pages (HWPRUNE_HUGEPAGES, GLIBC_TUNABLES)"),
)
_UNKNOWN_OK = ("pages",)  # recorded since 2026-12; "" in older tables: not a difference


def _proc_cpuinfo() -> list[dict[str, str]]:
    p = Path("/proc/cpuinfo")
    if not p.is_file():
        return []
    blocks: list[dict[str, str]] = [{}]
    for line in p.read_text(errors="replace").splitlines():
        if not line.strip():
            blocks.append({})
            continue
        k, _, v = line.partition(":")
        blocks[-1][k.strip()] = v.strip()
    return [b for b in blocks if b]


@lru_cache(maxsize=1)
def _cpu() -> tuple[str, str, int]:
    """(model name, vendor family/model/stepping, physical cores); /proc/cpuinfo first: py-cpuinfo takes ~1 s."""
    procs = _proc_cpuinfo()
    if procs and "model name" in procs[0]:
        p = procs[0]
        cpu_id = f"{p.get('vendor_id', '?')} {p.get('cpu family', '?')}/{p.get('model', '?')}/{p.get('stepping', '?')}"
        cores = {(b.get("physical id", "0"), b.get("core id", str(i))) for i, b in enumerate(procs)}
        return p["model name"], cpu_id, len(cores)
    try:
        import cpuinfo

        info = cpuinfo.get_cpu_info()
        fms = "/".join(str(info.get(k, "?")) for k in ("family", "model", "stepping"))
        cpu_id = f"{info.get('vendor_id_raw', '?')} {fms}"
        return str(info.get("brand_raw") or platform.processor() or "unknown"), cpu_id, int(os.cpu_count() or 1)
    except Exception:  # pragma: no cover - exotic platforms
        return platform.processor() or "unknown", "?", int(os.cpu_count() or 1)


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # pragma: no cover - optional module
        return ""


@dataclass(frozen=True)
class DeviceFingerprint:
    cpu: str
    cpu_id: str
    arch: str
    logical_cores: int
    physical_cores: int
    threads: int
    runtime: str  # backend name, e.g. "ort-cpu"
    runtime_version: str  # e.g. "onnxruntime 1.32.0"
    providers: tuple[str, ...]
    torch_version: str
    onnx_version: str
    batch: int
    seq: int
    dtype: str = "float32"
    gpu: str = ""  # empty on CPU backends
    pages: str = ""  # "huge" / "4k": how malloc memory was paged (hwprune.latency.pages); "" unknown

    @classmethod
    def current(
        cls,
        runtime: str = "ort-cpu",
        *,
        threads: int = 1,
        batch: int = 1,
        seq: int = 128,
        dtype: str = "float32",
        runtime_version: str | None = None,
    ) -> "DeviceFingerprint":
        """This machine with these settings; ``runtime_version`` defaults to asking the backend."""
        if runtime_version is None:
            from hwprune.latency._base import get_backend

            runtime_version = get_backend(runtime, threads=threads).version()
        cpu, cpu_id, physical = _cpu()
        providers: tuple[str, ...] = ()
        try:
            import onnxruntime

            providers = tuple(onnxruntime.get_available_providers())
        except ImportError:  # pragma: no cover - a declared dependency
            pass
        return cls(
            cpu=cpu,
            cpu_id=cpu_id,
            arch=platform.machine(),
            logical_cores=int(os.cpu_count() or 1),
            physical_cores=physical,
            threads=threads,
            runtime=runtime,
            runtime_version=runtime_version,
            providers=providers,
            torch_version=_version("torch"),
            onnx_version=_version("onnx"),
            batch=batch,
            seq=seq,
            dtype=dtype,
            gpu=_gpu_name(runtime),
            pages=page_mode(),
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["providers"] = list(self.providers)
        return d

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, where: str = "fingerprint") -> "DeviceFingerprint":
        names = {f.name for f in fields(cls)}
        # fields added later (dtype, gpu, pages) have defaults: older tables stay readable
        missing = [f.name for f in fields(cls) if f.name not in obj and f.default is MISSING]
        if missing:
            raise HwpruneError(f"{where}: fingerprint lacks {missing[0]!r}; re-profile to rebuild the table")
        kw = {k: v for k, v in obj.items() if k in names}
        kw["providers"] = tuple(kw.get("providers", ()))
        return cls(**kw)

    def mismatches(self, other: "DeviceFingerprint") -> list[str]:
        """Human-readable differences that change latency, e.g. ``"threads: 1 vs 4"`` (self vs other)."""
        return [
            f"{label}: {getattr(self, f)!r} vs {getattr(other, f)!r}"
            for f, label in _COMPARED
            if getattr(self, f) != getattr(other, f)
            and not (f in _UNKNOWN_OK and "" in (getattr(self, f), getattr(other, f)))
        ]


def _gpu_name(runtime: str) -> str:
    if runtime == "ort-cpu":
        return ""
    try:  # torch is a dependency anyway; it is the cheapest way to name the GPU
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    except Exception:  # pragma: no cover
        return ""
