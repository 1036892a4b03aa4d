"""Topology: the parallel degrees, the device, and the only place process groups are made.

Degrees are validated against the world size (dp x pp x tp == world). Named mesh axes follow
torchtitan's `ParallelDims`: strategies ask for `topo.group("dp")` instead of reaching for
module-level globals. The backend is chosen once here: gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from paratrain.config import ConfigError, RunConfig

AXES = ("dp", "pp", "tp")
# The mesh has one more axis, "dp_shard", always of size 1: FSDP2 replicates over ("dp",
# "dp_shard") as hybrid sharding with shard groups of one, and FSDP2 requires that mesh and the
# tp mesh of DTensor parameters to come from one root mesh.
MESH_AXES = ("dp", "dp_shard", "pp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    pp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def trains(self, rank: int) -> bool:
        """Whether `rank` runs the trainer (layout.ServerDims: not its serving ranks)."""
        return True

    def check(self, world_size: int) -> None:
        if min(self.dp, self.pp, self.tp) < 1 or self.world_size != world_size:
            raise ConfigError(
                f"parallel degrees dp={self.dp} x pp={self.pp} x tp={self.tp} = {self.world_size}: "
                f"must multiply to the number of processes, {world_size}")


def backend_for(device: torch.device) -> str:
    """The one place the backend is chosen: NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def resolve_device(run: RunConfig, local_rank: int) -> torch.device:
    kind = run.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device = 'cuda': no CUDA device is visible; use 'cpu' or 'auto'")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class Topology:
    """Rank, world, device and named process groups of one worker; passed explicitly.

    Under fault-tolerant replica groups (torchft, `fault_tolerance.replica_groups`) the world and
    the mesh are this group's processes; `replica` and `replicas` say which group of how many, the
    data is sharded over all of them, and `rank` is unique in the job (files, seeds, faults)."""

    def __init__(self, dims: ParallelDims, rank: int, local_rank: int, device: torch.device, mesh=None,
                 replica: int = 0, replicas: int = 1):
        self.dims = dims
        self.rank = rank
        self.local_rank = local_rank
        self.device = device
        self.mesh = mesh  # torch DeviceMesh with axes MESH_AXES, or None when world_size == 1
        self.replica, self.replicas = replica, replicas

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def group_rank(self) -> int:
        """This process's rank in its own world: `rank` without replica groups, its place in its
        replica group with them."""
        return self.rank - self.replica * self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return backend_for(self.device)

    def size(self, axis: str) -> int:
        return getattr(self.dims, axis)

    def axis_rank(self, axis: str) -> int:
        if self.mesh is not None:
            return self.mesh.get_local_rank(axis)
        # No mesh: one process alone, or a rank that rejoined a job outside its group (`from_env`'s
        # `alone`): its place in the mesh's (dp, dp_shard, pp, tp) order, from its rank.
        shape = {"dp": self.dims.dp, "dp_shard": 1, "pp": self.dims.pp, "tp": self.dims.tp}
        place = self.rank - self.replica * self.world_size
        for name in reversed(MESH_AXES):
            if name == axis:
                return place % shape[name]
            place //= shape[name]
        raise KeyError(axis)

    def group(self, axis: str):
        """The process group of one mesh axis (None in a one-process run)."""
        return None if self.mesh is None else self.mesh.get_group(axis)

    def data_shard(self) -> tuple[int, int]:
        """(which, of how many): this rank's share of each global batch, over the dp axis of
        every replica group."""
        return self.replica * self.size("dp") + self.axis_rank("dp"), self.replicas * self.size("dp")

    @property
    def processes(self) -> int:
        """The job's training processes, every replica group's."""
        return self.world_size * self.replicas

    @classmethod
    def single(cls, run: RunConfig) -> "Topology":
        _set_threads(run)
        return cls(ParallelDims(), rank=0, local_rank=0, device=resolve_device(run, 0))

    @classmethod
    def from_env(cls, run: RunConfig, dims_for_world, replicas: int = 1, alone: bool = False) -> "Topology":
        """Join the job that torchrun (or `paratrain run`) started; `dims_for_world(n)` -> ParallelDims.
        `replicas` > 1: this process is in one of that many replica groups (REPLICA_GROUP_ID).
        `alone`: a worker restarted into a running job whose group cannot take it back (a gloo
        group's members are fixed): its rank and place in the job, and a process group of its own
        (the parameter server's rejoining worker, which talks to the servers on channels of its own)."""
        _set_threads(run)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        replica = replica_group(replicas)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = resolve_device(run, local_rank)
        dims = dims_for_world(world)
        dims.check(world)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if alone:
            dist.init_process_group(backend=backend_for(device), store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=run.timeout_s))
            topo = cls(dims, replica * world + rank, local_rank, device, None, replica, replicas)
            topo.owns_group = topo.alone = True
            return topo
        owns_group = not dist.is_initialized()  # a caller's own group is reused, and left to the caller
        if owns_group:
            # A job on one machine (MASTER_ADDR a loopback address, as `paratrain run` sets it): rank 0's
            # process-group store listens there only; init_process_group's own store shares its server.
            store = _loopback_pg_store() if rank == 0 else None
            dist.init_process_group(
                backend=backend_for(device),
                timeout=timedelta(seconds=run.timeout_s),  # finite: a lost peer fails the job, not hangs it
                device_id=device if device.type == "cuda" else None,
            )
            del store  # the group's own store holds the server from here on
        from torch.distributed.device_mesh import init_device_mesh

        shape = (dims.dp, 1, dims.pp, dims.tp)
        # Every axis's group gets run.timeout_s too: torch's new_group defaults to 30 minutes, whatever
        # the world group's timeout (measured: a dp2 x tp2 mesh with a hung rank waited 5 minutes and on).
        # An axis spanning the whole world keeps the world group (no options: torch reuses it).
        timeout = timedelta(seconds=run.timeout_s)
        override = {axis: (backend_for(device), _options_with(backend_for(device), timeout))
                    for axis, n in zip(MESH_AXES, shape) if n != world}
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_AXES, backend_override=override)
        topo = cls(dims, replica * world + rank, local_rank, device, mesh, replica, replicas)
        topo.owns_group = owns_group
        return topo

    owns_group = False
    alone = False  # from_env(alone=True): restarted into a running job, in a process group of its own

    def destroy(self) -> None:
        """Tear down the process groups if this topology started them.

        Under a caller's own group nothing is destroyed, the mesh's sub-groups included: torch
        hands a later mesh cached groups (measured: destroying them made the next train() fail
        with "Could not resolve the process group"), at the cost of a few groups per call."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


REPLICA_ENV = "REPLICA_GROUP_ID"  # torchft's name: which replica group this torchrun job is
REJOIN_ENV = "PARATRAIN_REJOIN"  # set by apart.py on a worker it restarted into a running job: `alone`
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # torchft's: the Lighthouse's address, http://host:port


def replica_group(replicas: int) -> int:
    """This process's replica group, 0..replicas-1, from its environment (0 without replica groups)."""
    if replicas <= 1:
        return 0
    value = os.environ.get(REPLICA_ENV, "")
    if not value.isdigit() or int(value) >= replicas:
        raise ConfigError(f"fault_tolerance.replica_groups = {replicas}: each replica group's torchrun needs "
                          f"{REPLICA_ENV}=0..{replicas - 1} in its environment, got {value!r} (paratrain run sets it)")
    return int(value)


def _options_with(backend: str, timeout: timedelta):
    """The backend's process-group options with this timeout (new_group's own default is 30 min)."""
    options = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options


def loopback_store(port: int = 0, host: str = "127.0.0.1") -> dist.TCPStore | None:
    """A TCPStore server that listens on `host` (a loopback address) only; None if `port` is taken.

    torch's TCPStore listens on every interface whatever host it is given (measured, torch 2.13,
    libuv and classic servers alike: [::]:port), and the one option that says where is
    `master_listen_fd`, a socket already listening, which the store then owns. The server is
    multi-tenant: a later `TCPStore(..., port, is_master=True, multi_tenant=True)` in this process,
    as torch's env:// rendezvous and its c10d rendezvous backend make theirs, shares this server
    instead of opening its own. A taken port (another job's, or this process's server still alive)
    is left to torch, which reuses its own server or fails as it would have anyway."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError:
        sock.close()
        return None
    port = sock.getsockname()[1]
    return dist.TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                         master_listen_fd=sock.detach())


def _loopback_pg_store() -> dist.TCPStore | None:
    """Rank 0's process-group store on MASTER_ADDR, when that is an IPv4 loopback address."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        return None  # torchrun's agent hosts the store; the ranks are its clients
    try:
        addr = ipaddress.ip_address(os.environ.get("MASTER_ADDR", ""))
    except ValueError:  # a host name: peers may be on other machines, torch binds as it does
        return None
    if addr.version != 4 or not addr.is_loopback or "MASTER_PORT" not in os.environ:
        return None
    return loopback_store(int(os.environ["MASTER_PORT"]), str(addr))


def _set_threads(run: RunConfig) -> None:
    # Measured: two threads per rank on two cores made steps 2x slower, p90 14x slower.
    torch.set_num_threads(run.threads_per_rank)
