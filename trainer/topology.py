"""The hardware a plan targets: ranks, hosts, memory and bandwidths. Pure data, no torch.

Bandwidths are bytes per second per device (one direction). The defaults are round numbers
from the vendors' data sheets, meant for *relative* costs (which placement is cheaper), not
for predicting wall-clock time:

- H100 SXM: 80 GB HBM3 at 3.35 TB/s; NVLink 4 at 450 GB/s per direction; PCIe 5 x16 host
  link ~55 GB/s; one 400 Gb/s NIC per GPU between hosts (50 GB/s).
- H200 SXM: 141 GB HBM3e at 4.8 TB/s; otherwise like H100.
- CPU: each rank is a process whose "device" is host DRAM (~20 GB/s of streaming
  bandwidth per rank); gloo over loopback/shared memory (~5 GB/s) inside a host and
  100 Gb/s Ethernet (12.5 GB/s) between hosts.

Example:
    >>> topo = Topology.for_device(DeviceKind.H100, world_size=16)
    >>> topo.num_hosts, topo.host_of(9)
    (2, 1)
"""

from __future__ import annotations

import dataclasses

from trainer.config import DeviceKind
from trainer.errors import TrainerConfigError

__all__ = ["Topology", "DeviceKind", "DEVICE_DEFAULTS"]

_GB = 1_000_000_000
_GIB = 1 << 30

# kind -> (device_memory_bytes, host_memory_bytes per host, devices_per_host, device_bw,
#          host_to_device_bw, intra_host_bw, inter_host_bw)
DEVICE_DEFAULTS: dict[DeviceKind, dict[str, int]] = {
    DeviceKind.CPU: dict(
        device_memory_bytes=16 * _GIB, host_memory_bytes=64 * _GIB, devices_per_host=0,
        device_bw_bytes_per_s=20 * _GB, host_to_device_bw_bytes_per_s=20 * _GB,
        intra_host_bw_bytes_per_s=5 * _GB, inter_host_bw_bytes_per_s=12_500_000_000,
    ),
    DeviceKind.H100: dict(
        device_memory_bytes=80 * _GB, host_memory_bytes=2048 * _GB, devices_per_host=8,
        device_bw_bytes_per_s=3350 * _GB, host_to_device_bw_bytes_per_s=55 * _GB,
        intra_host_bw_bytes_per_s=450 * _GB, inter_host_bw_bytes_per_s=50 * _GB,
    ),
    DeviceKind.H200: dict(
        device_memory_bytes=141 * _GB, host_memory_bytes=2048 * _GB, devices_per_host=8,
        device_bw_bytes_per_s=4800 * _GB, host_to_device_bw_bytes_per_s=55 * _GB,
        intra_host_bw_bytes_per_s=450 * _GB, inter_host_bw_bytes_per_s=50 * _GB,
    ),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """``world_size`` ranks, ``devices_per_host`` consecutive ranks per host (rank r lives on
    host ``r // devices_per_host``; the last host may hold fewer). Memory is per device and
    per host; ``host_memory_bytes`` is shared by the host's ranks (row-cache backing store)."""

    world_size: int
    devices_per_host: int
    device_memory_bytes: int
    host_memory_bytes: int
    device_bw_bytes_per_s: float
    host_to_device_bw_bytes_per_s: float
    intra_host_bw_bytes_per_s: float
    inter_host_bw_bytes_per_s: float
    device: DeviceKind = DeviceKind.CPU

    def __post_init__(self):
        if self.world_size < 1:
            raise TrainerConfigError(f"world_size must be >= 1, got {self.world_size}")
        if self.devices_per_host < 1:
            raise TrainerConfigError(f"devices_per_host must be >= 1, got {self.devices_per_host}")
        for f in ("device_memory_bytes", "host_memory_bytes", "device_bw_bytes_per_s",
                  "host_to_device_bw_bytes_per_s", "intra_host_bw_bytes_per_s",
                  "inter_host_bw_bytes_per_s"):
            if getattr(self, f) <= 0:
                raise TrainerConfigError(f"topology {f} must be > 0, got {getattr(self, f)}")

    @classmethod
    def for_device(cls, device: DeviceKind, world_size: int, *, devices_per_host: int = 0,
                   device_memory_bytes: int = 0, host_memory_bytes: int = 0) -> "Topology":
        """The defaults of ``device`` (see the module docstring); 0 keeps a default. A CPU
        topology puts every rank on one host unless ``devices_per_host`` says otherwise."""
        if device is DeviceKind.AUTO:
            raise TrainerConfigError(
                "device 'auto' must be resolved to cpu, h100 or h200 before planning "
                "(trainer.dist.detect_device_kind does that on the training host)"
            )
        d = dict(DEVICE_DEFAULTS[device])
        per_host = devices_per_host or d.pop("devices_per_host") or world_size
        d.pop("devices_per_host", None)
        if device_memory_bytes:
            d["device_memory_bytes"] = device_memory_bytes
        if host_memory_bytes:
            d["host_memory_bytes"] = host_memory_bytes
        return cls(world_size=world_size, devices_per_host=min(per_host, world_size),
                   device=device, **d)

    @property
    def num_hosts(self) -> int:
        return -(-self.world_size // self.devices_per_host)

    def host_of(self, rank: int) -> int:
        return rank // self.devices_per_host

    def ranks_of_host(self, host: int) -> tuple[int, ...]:
        lo = host * self.devices_per_host
        return tuple(range(lo, min(lo + self.devices_per_host, self.world_size)))

    def exchange_bw_bytes_per_s(self, ranks: tuple[int, ...] | None = None) -> float:
        """Bandwidth of a collective among ``ranks`` (all ranks when None): the slower
        inter-host links as soon as the group spans hosts."""
        ranks = tuple(range(self.world_size)) if ranks is None else ranks
        hosts = {self.host_of(r) for r in ranks}
        return self.intra_host_bw_bytes_per_s if len(hosts) <= 1 else self.inter_host_bw_bytes_per_s

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["device"] = self.device.value
        d["num_hosts"] = self.num_hosts
        return d
