"""Fault injection for the map ops: the run's fault spec and the MapOps wrapper that applies it.

A spec string such as ``"mapping-error=0.01,iova-alloc=0.05,max-mapping-size=4096,seed=7"``
selects, per run:

- ``mapping-error=p``: each streaming ``map_page`` fails transiently with probability p (what
  a full swiotlb or a failed IOMMU page-table allocation looks like to Linux's virtio core);
- ``iova-alloc=p``: each node allocation of the bounce IOVA domain fails with probability p, so
  slot allocations fail (transient mapping errors) and frees take the deferred-erase path under
  real traffic (bounce mode only: direct mapping has no IOVA domain of its own to allocate from);
- ``max-mapping-size=n``: a reduced ``max_mapping_size`` (long descriptors are mapped in pieces);
- ``seed=n``: the random stream, so a run repeats exactly.

Coherent (ring) mappings are not failed: Linux's map_page failure path is per buffer, rings are
allocated once at probe.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from harness.dma.errors import DmaFault
from harness.dma.iova_faults import ERASE, INSERT, FailureInjector
from harness.dma.mapops import ATTR_COHERENT, Direction, DmaHandle, MapCtx, MapOps, failed_handle

_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclass(frozen=True)
class FaultSpec:
    """What to inject in one run (see the module docstring); the default injects nothing."""

    mapping_error: float = 0.0
    iova_alloc: float = 0.0
    max_mapping_size: int | None = None
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse ``key=value,...``; ValueError names the offending item."""
        values: dict[str, object] = {}
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().lower().replace("_", "-")
            value = value.strip()
            if not sep or not value:
                raise ValueError(f"fault spec item {item!r} is not key=value")
            if key in values:
                raise ValueError(f"fault spec key {key!r} given twice")
            if key in ("mapping-error", "iova-alloc"):
                values[key] = _probability(key, value)
            elif key == "max-mapping-size":
                size = _size(key, value)
                if size < 1:
                    raise ValueError(f"fault spec {key}={value!r}: must be at least 1")
                values[key] = size
            elif key == "seed":
                values[key] = _int(key, value)
            else:
                raise ValueError(
                    f"unknown fault {key!r} (known: mapping-error, iova-alloc, "
                    "max-mapping-size, seed)"
                )
        return cls(
            mapping_error=float(values.get("mapping-error", 0.0)),  # type: ignore[arg-type]
            iova_alloc=float(values.get("iova-alloc", 0.0)),  # type: ignore[arg-type]
            max_mapping_size=values.get("max-mapping-size"),  # type: ignore[arg-type]
            seed=int(values.get("seed", 0)),  # type: ignore[call-overload]
        )

    @property
    def active(self) -> bool:
        """Whether anything is injected at all."""
        return bool(self.mapping_error or self.iova_alloc or self.max_mapping_size is not None)

    def __str__(self) -> str:
        parts = []
        if self.mapping_error:
            parts.append(f"mapping-error={self.mapping_error:g}")
        if self.iova_alloc:
            parts.append(f"iova-alloc={self.iova_alloc:g}")
        if self.max_mapping_size is not None:
            parts.append(f"max-mapping-size={self.max_mapping_size}")
        parts.append(f"seed={self.seed}")
        return ",".join(parts)

    def node_alloc_injector(self) -> FailureInjector | None:
        """The bounce domain's node-allocation hook for ``iova-alloc`` (None when off)."""
        if not self.iova_alloc:
            return None
        # A stream of its own (seed + 1): adding mapping errors must not change which node
        # allocations fail.
        return FailureInjector(self.iova_alloc, seed=self.seed + 1, ops=(INSERT, ERASE))


def _int(key: str, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise ValueError(f"fault spec {key}={value!r}: not an integer") from None


def _size(key: str, value: str) -> int:
    mult = _SUFFIX.get(value[-1].lower(), 1)
    return _int(key, value[:-1] if mult > 1 else value) * mult


def _probability(key: str, value: str) -> float:
    try:
        p = float(value)
    except ValueError:
        raise ValueError(f"fault spec {key}={value!r}: not a number") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"fault spec {key}={value!r}: probability must be in [0, 1]")
    return p


class FaultInjectingMapOps:
    """MapOps wrapper that fails streaming maps at random and lowers ``max_mapping_size``.

    ``injector`` is the bounce domain's node-allocation hook (if any): only counted here.
    """

    def __init__(
        self, inner: MapOps, spec: FaultSpec, *, injector: FailureInjector | None = None
    ) -> None:
        self.inner = inner
        self.spec = spec
        self.injector = injector
        self._p = spec.mapping_error
        self._rng = random.Random(spec.seed)
        self._max = inner.max_mapping_size()
        if spec.max_mapping_size is not None:
            self._max = min(self._max, spec.max_mapping_size)
        self.injected_mapping_errors = 0
        self.refused_too_large = 0

    def map_page(
        self, iova: int, size: int, direction: Direction, attrs: int = 0,
        ctx: MapCtx | None = None,
    ) -> DmaHandle:  # fmt: skip
        if not attrs & ATTR_COHERENT:
            if self._p and self._rng.random() < self._p:
                self.injected_mapping_errors += 1
                fault = DmaFault(iova, size, "injected mapping error", transient=True)
                return failed_handle(iova, size, direction, fault, ctx)
            if size > self._max:
                self.refused_too_large += 1
                fault = DmaFault(iova, size, f"larger than injected max_mapping_size {self._max}")
                return failed_handle(iova, size, direction, fault, ctx)
        return self.inner.map_page(iova, size, direction, attrs, ctx)

    def unmap_page(self, handle: DmaHandle, direction: Direction) -> None:
        self.inner.unmap_page(handle, direction)

    def sync_single_for_cpu(self, handle: DmaHandle, direction: Direction) -> None:
        self.inner.sync_single_for_cpu(handle, direction)

    def sync_single_for_device(self, handle: DmaHandle, direction: Direction) -> None:
        self.inner.sync_single_for_device(handle, direction)

    def alloc(self, size: int) -> DmaHandle:
        return self.inner.alloc(size)

    def free(self, handle: DmaHandle) -> None:
        self.inner.free(handle)

    def need_sync(self, handle: DmaHandle) -> bool:
        return self.inner.need_sync(handle)

    def mapping_error(self, handle: DmaHandle) -> bool:
        return handle.error is not None

    def max_mapping_size(self) -> int:
        return self._max

    def contiguous(self, iova: int, size: int) -> int:
        return self.inner.contiguous(iova, size)

    def housekeeping(self) -> None:
        hook = getattr(self.inner, "housekeeping", None)
        if hook is not None:
            hook()

    def stats(self) -> dict[str, object]:
        inj = self.injector
        return {
            "spec": str(self.spec),
            "injected": {
                "mapping_error": self.injected_mapping_errors,
                "iova_alloc": dict(inj.failures) if inj is not None else {},
            },
            "node_alloc_requests": dict(inj.requests) if inj is not None else {},
            "refused_too_large": self.refused_too_large,
        }
