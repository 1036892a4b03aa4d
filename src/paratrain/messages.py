"""paratrain's own messages between ranks, as plain data: no pickle crosses the wire.

Why: torch's `*_object` collectives (all_gather_object, gather_object, broadcast_object_list,
send/recv_object_list) pickle what a rank sends and unpickle what its peers send, and unpickling
runs whatever code the bytes name: a peer, or anyone who can reach a job's sockets, chooses code
that runs here. These messages are trees of dicts, lists, tuples, str, int, float, bool, None
and tensors (RNG states, state dicts, optimizer param_groups with their tuples, timings), so
they need no code at all.

Format: one uint8 tensor. A magic word and the header's length, a JSON header describing the
tree, then the tensors' raw bytes, back to back. In the header a list is a JSON array and every
other container is an object with one key: {"tuple": [...]}, {"dict": [[key, value], ...]}
(keys of any encodable type, not only str) and {"tensor": {"dtype", "shape", "offset"}}, a
placeholder for `offset` bytes into the data. Decoding is `json.loads` and byte slices of the
buffer viewed as each dtype (copied, so no result keeps the buffer alive); anything else is a
`MessageError`. Tensors come back contiguous, on the CPU, without autograd history.

The collectives send the sizes first, as int64 tensors, then the payloads sized exactly (padded
to the largest where gloo wants equal sizes): gloo aborts the receiving process when a message
is larger than its buffer, so nothing is sized by guess. `dst` / `src` are global ranks, as in
torch's own collectives.
"""
from __future__ import annotations

import json
import struct

import torch
import torch.distributed as dist

MAGIC = b"PTM1"
_PREFIX = struct.Struct("<4sI")  # magic, header length in bytes
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)}


class MessageError(ValueError):
    """A tree that cannot be encoded, or bytes that are not a message this module wrote."""


def encode(tree) -> torch.Tensor:
    """The tree as one 1-D uint8 tensor (header, then every tensor's bytes)."""
    chunks: list[torch.Tensor] = []
    offset = 0

    def visit(v, path: str):
        nonlocal offset
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return int(v)  # an IntEnum's value: JSON has numbers only
        if isinstance(v, float):
            return float(v)  # NaN and infinities too (Python's JSON reads them back)
        if isinstance(v, list):
            return [visit(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return {"tuple": [visit(x, f"{path}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, dict):
            return {"dict": [[visit(k, f"{path} key {k!r}"), visit(x, f"{path}[{k!r}]")] for k, x in v.items()]}
        if isinstance(v, torch.Tensor):
            name = str(v.dtype).removeprefix("torch.")
            if name not in _DTYPES or v.layout != torch.strided:
                raise MessageError(f"cannot send the {v.layout} {v.dtype} tensor at {path or 'the top'}")
            data = v.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            node = {"tensor": {"dtype": name, "shape": list(v.shape), "offset": offset}}
            chunks.append(data)
            offset += data.numel()
            return node
        raise MessageError(f"cannot send a {type(v).__name__} at {path or 'the top'}: messages carry dicts, "
                           "lists, tuples, str, int, float, bool, None and tensors")

    header = json.dumps(visit(tree, ""), separators=(",", ":")).encode()
    prefix = torch.frombuffer(bytearray(_PREFIX.pack(MAGIC, len(header)) + header), dtype=torch.uint8)
    return torch.cat([prefix, *chunks])


def decode(buf: torch.Tensor):
    """The tree `encode` made of `buf`; MessageError for anything else (never unpickled)."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise MessageError(f"a message is a 1-D uint8 tensor, not {buf.dtype} of shape {tuple(buf.shape)}")
    buf = buf.detach().cpu().contiguous()
    if buf.numel() < _PREFIX.size:
        raise MessageError(f"not a paratrain message: {buf.numel()} bytes, shorter than its prefix")
    magic, size = _PREFIX.unpack(buf[:_PREFIX.size].numpy().tobytes())
    if magic != MAGIC:
        raise MessageError(f"not a paratrain message: it starts with {magic!r}, not {MAGIC!r}")
    start = _PREFIX.size + size
    if start > buf.numel():
        raise MessageError(f"truncated message: a {size}-byte header in {buf.numel()} bytes")
    try:
        header = json.loads(buf[_PREFIX.size:start].numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MessageError(f"not a paratrain message: its header is not JSON ({e})") from None
    data = buf[start:]

    def tensor(spec) -> torch.Tensor:
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "offset"}:
            raise MessageError(f"bad tensor entry {spec!r}")
        dtype, shape, offset = _DTYPES.get(spec["dtype"]), spec["shape"], spec["offset"]
        if (dtype is None or not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape)
                or type(offset) is not int or offset < 0):
            raise MessageError(f"bad tensor entry {spec!r}")
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * dtype.itemsize
        if offset + nbytes > data.numel():
            raise MessageError(f"truncated message: a tensor at byte {offset} of {nbytes} bytes, "
                               f"{data.numel()} bytes of data")
        return data[offset:offset + nbytes].clone().view(dtype).reshape(shape)

    def visit(node):
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [visit(x) for x in node]
        if isinstance(node, dict) and len(node) == 1:
            (kind, value), = node.items()
            if kind == "tuple" and isinstance(value, list):
                return tuple(visit(x) for x in value)
            if kind == "dict" and isinstance(value, list) and all(isinstance(i, list) and len(i) == 2 for i in value):
                try:
                    return {visit(k): visit(v) for k, v in value}
                except TypeError as e:  # an unhashable key
                    raise MessageError(f"bad dict key in message: {e}") from None
            if kind == "tensor":
                return tensor(value)
        raise MessageError(f"bad message node {json.dumps(node)[:80]}")

    try:
        return visit(header)
    except RecursionError:
        raise MessageError("bad message: nested too deeply") from None


def _device(group) -> torch.device:
    # The device torch's own object collectives use for `group`'s backend: the CPU for gloo, the
    # current accelerator for NCCL (internal helper, as the public API has no getter).
    return torch.device(dist.distributed_c10d._get_object_coll_device(group))


def _sizes(payload: torch.Tensor, group) -> list[int]:
    """Every rank's payload size in bytes, group order (an all-gather of one int64 each)."""
    mine = torch.tensor([payload.numel()], dtype=torch.int64, device=payload.device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


def _padded(payload: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.cat([payload, payload.new_zeros(numel - payload.numel())])


def all_gather(obj, group=None) -> list:
    """Every rank's `obj`, in group rank order, on every rank of `group`."""
    payload = encode(obj).to(_device(group))
    sizes = _sizes(payload, group)
    bufs = [payload.new_empty(max(sizes)) for _ in sizes]
    dist.all_gather(bufs, _padded(payload, max(sizes)), group=group)
    return [decode(b[:n]) for b, n in zip(bufs, sizes)]


def gather(obj, dst: int = 0, group=None) -> list | None:
    """Every rank's `obj`, in group rank order, on global rank `dst`; None on the others."""
    payload = encode(obj).to(_device(group))
    sizes = _sizes(payload, group)  # every rank pads to the largest: gloo's gather wants equal sizes
    here = dist.get_rank() == dst
    bufs = [payload.new_empty(max(sizes)) for _ in sizes] if here else None
    dist.gather(_padded(payload, max(sizes)), bufs, dst=dst, group=group)
    return [decode(b[:n]) for b, n in zip(bufs, sizes)] if here else None


def broadcast(obj, src: int = 0, group=None):
    """Global rank `src`'s `obj` on every rank of `group` (the others' `obj` is ignored)."""
    device, here = _device(group), dist.get_rank() == src
    payload = encode(obj).to(device) if here else None
    size = torch.tensor([payload.numel() if here else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    buf = payload if here else torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=src, group=group)
    return obj if here else decode(buf)


def send(obj, dst: int, size_tag: int = 0, payload_tag: int = 0) -> int:
    """Point-to-point to global rank `dst`: the size (int64), then the payload. Returns bytes sent."""
    payload = encode(obj).to(_device(None))
    dist.send(torch.tensor([payload.numel()], dtype=torch.int64, device=payload.device), dst=dst, tag=size_tag)
    dist.send(payload, dst=dst, tag=payload_tag)
    return 8 + payload.numel()


def recv(src: int, size_tag: int = 0, payload_tag: int = 0):
    """What `send` sent from global rank `src` with the same tags."""
    device = _device(None)
    size = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(size, src=src, tag=size_tag)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.recv(buf, src=src, tag=payload_tag)
    return decode(buf)
