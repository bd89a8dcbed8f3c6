"""Collectives per logging step under torch.distributed: measured on 8 gloo processes, and on paper (run by hand).

A small Llama-like pre-LN transformer (RMSNorm, attention q/k/v/o and a SwiGLU w1/w3/w2, no biases: 9 tensors
and 2 residual merges per layer, plus the embedding, the final norm and the head) is trained on 8 CPU
processes (gloo, 127.0.0.1) in the layouts torchtitan uses: FSDP 8; FSDP 4 x TP 2 with sequence parallel;
HSDP 2 x 4 (replicate x shard); pipeline parallel 2 x (FSDP 2 x TP 2, sequence parallel), ``ScheduleGPipe``.
Each rank runs ``Monitor(model, optimizer=opt, every=2, log_dir=...)`` with the same ``log_dir`` (only rank 0
writes TensorBoard, as docs/quickstart.md tells users).

Around ``optimizer.step()``, where that Monitor measures, every collective is counted with its bytes (what each
rank puts in: numel x element size of the input tensor): gradwatch's own ``torch.distributed`` calls, wrapped
on the module as the tests' ``_all_reduces()`` does, and the functional collectives DTensor issues for torch's
total norm in the first step's self-check, seen by a dispatch mode as torch's ``CommDebugMode`` sees them. The
first logging step, a step that does not log and a later logging step are counted on every rank, and compared
call by call (kind, group size, bytes) with what :func:`paper` predicts from gradwatch's rules
(gradwatch/measure: meter, norms, parallel, selfcheck, stages). Then :func:`paper` gives the figures for an
80-layer model (723 tensors, 160 residual merges) on 1,024 GPUs. ~1 minute on 2 cores, most of it starting
the 8 processes.

    PYTHONPATH=. .venv/bin/python benchmarks/distributed_collectives.py
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import pickle
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import gradwatch
from gradwatch.names import FLOW_METRICS

WORLD = 8
LAYERS = 4
DIM, HEAD_DIM, HIDDEN, VOCAB, SEQ, BATCH = 32, 8, 64, 64, 8, 8


# ---------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """Pipeline stages x HSDP replicas x FSDP shards x tensor parallel (always with sequence parallel)."""

    label: str
    shard: int = 1
    tp: int = 1
    replicate: int = 1
    pp: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.replicate * self.shard * self.tp

    @property
    def stage_size(self) -> int:
        return self.world // self.pp


# each CPU layout on 8 processes, and the same kind of layout on 1,024 GPUs
LAYOUTS = {
    "fsdp": (Layout("FSDP 8", shard=8), Layout("FSDP 1,024", shard=1024)),
    "fsdp_tp": (Layout("FSDP 4 x TP 2 (SP)", shard=4, tp=2), Layout("FSDP 128 x TP 8 (SP)", shard=128, tp=8)),
    "hsdp": (Layout("HSDP 2 x 4", replicate=2, shard=4), Layout("HSDP 8 x 128", replicate=8, shard=128)),
    "pp_fsdp_tp": (Layout("PP 2 x (FSDP 2 x TP 2, SP)", pp=2, shard=2, tp=2),
                   Layout("PP 4 x (FSDP 32 x TP 8, SP)", pp=4, shard=32, tp=8)),
}
PAPER_LAYERS = 80


# ---------------------------------------------------------------------------------------------- the model
class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]  # heads from the local width: tensor parallel splits them
        q, k, v = (w(x).view(b, t, -1, HEAD_DIM).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.attention = nn.RMSNorm(DIM), Attention()
        self.ffn_norm, self.feed_forward = nn.RMSNorm(DIM), FeedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """torchtitan's shape: ``layers`` is a ModuleDict, so a pipeline stage deletes what it does not hold and
    keeps the whole model's names; a stage without the embedding takes hidden states."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok_embeddings: nn.Module | None = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(LAYERS)})
        self.norm: nn.Module | None = nn.RMSNorm(DIM)
        self.output: nn.Module | None = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        for layer in self.layers.values():
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h


def stage_names(layers: int, pp: int) -> list[tuple[tuple[str, ...], ...]]:
    """What each pipeline stage's monitor records of this model, as gradwatch names it: (layers, layer metrics,
    blocks, layer kinds), the tuple a stage's first rank sends in ``Stages`` (one unit per tensor: no biases)."""
    own = (("attention_norm", "norm"), ("attention.wq", "weight"), ("attention.wk", "weight"),
           ("attention.wv", "weight"), ("attention.wo", "weight"), ("ffn_norm", "norm"),
           ("feed_forward.w1", "weight"), ("feed_forward.w3", "weight"), ("feed_forward.w2", "weight"))
    metrics = ("grad_norm", "weight_norm", "grad_to_weight", "update_to_weight")
    out = []
    for s in range(pp):
        names, kinds, blocks = [], [], []
        if s == 0:
            names, kinds = ["tok_embeddings"], ["embedding"]
        for i in range(s * layers // pp, (s + 1) * layers // pp):
            names += [f"layers.{i}.{n}" for n, _ in own]
            kinds += [k for _, k in own]
            blocks += [f"layers.{i}[0]", f"layers.{i}[1]"]  # the attention and MLP residual merges
        if s == pp - 1:
            names, kinds = names + ["norm", "output"], kinds + ["norm", "weight"]
        out.append((tuple(names), metrics, tuple(blocks), tuple(kinds)))
    return out


def tensor_parallel(model: Llama, mesh) -> None:
    """torchtitan's plan with sequence parallel: the residual stream and the norms split along the sequence."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module,
    )

    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.output is not None:
        top.update(norm=SequenceParallel(), output=ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()))
    parallelize_module(model, mesh, top)
    stream = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    for block in model.layers.values():
        parallelize_module(block, mesh, {
            "attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel(),
            "attention": stream, "feed_forward": stream,
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })


# ---------------------------------------------------------------------------------------------- counting
@dataclass
class Call:
    """One collective: a ``torch.distributed`` function gradwatch called, or a functional collective torch
    issued (DTensor's, for its own total norm)."""

    who: str  # "gradwatch" or "torch"
    name: str  # all_reduce, all_gather, ...; new_group for a process group made
    ranks: int  # the size of the group it runs over
    bytes: int = 0  # what each rank puts in: numel x element size of its input tensor(s)
    what: str = ""  # what it is for (paper only)
    ops: list[str] = field(default_factory=list)  # the dispatcher's collectives it made (measured only)

    def key(self) -> tuple[str, str, int, int]:
        return self.who, self.name, self.ranks, self.bytes


# gradwatch looks its torch.distributed calls up on the module at each call: wrapping them there sees them
_APIS = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter",
         "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "all_to_all", "all_to_all_single",
         "gather", "gather_object", "scatter", "scatter_object_list", "reduce", "barrier", "new_group", "send",
         "recv", "isend", "irecv")
_INPUTS = {"input", "inputs", "tensor", "tensors", "input_tensor", "input_tensors", "self"}
_NOT_COLLECTIVES = {"wait_tensor", "_wrap_tensor_autograd"}


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _group_size(group) -> int:
    if isinstance(group, str):  # a functional collective's group name
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(group)
    return group.size()


class _Counter:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.inside: Call | None = None  # the gradwatch call in progress

    def op(self, func, args, kwargs) -> None:
        """A collective that reached the dispatcher: part of the gradwatch call in progress, else torch's own."""
        schema = func._schema
        values = dict(zip((a.name for a in schema.arguments), args)) | kwargs
        size = sum(_tensor_bytes(v) for k, v in values.items() if k in _INPUTS)
        op = f"{schema.name} {size} B"
        if self.inside is not None:
            self.inside.ops.append(op)
            self.inside.bytes += size
        else:
            group = values.get("process_group", values.get("group_name"))
            self.calls.append(Call("torch", schema.name.split("::")[-1].rstrip("_"), _group_size(group), size,
                                   ops=[op]))


def _dispatch_mode(counter: _Counter):
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class Collectives(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(issubclass(t, DTensor) for t in types):
                return NotImplemented  # DTensor turns its op into local ops and collectives, seen here next
            kwargs = kwargs or {}
            namespace, _, name = func._schema.name.partition("::")
            if namespace in ("c10d", "_c10d_functional", "c10d_functional") and name not in _NOT_COLLECTIVES:
                counter.op(func, args, kwargs)
            return func(*args, **kwargs)

    return Collectives()


@contextlib.contextmanager
def counted() -> Iterator[list[Call]]:
    """Every collective made inside the block, in order."""
    counter = _Counter()
    real = {name: getattr(dist, name) for name in _APIS if hasattr(dist, name)}

    def wrap(name, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if counter.inside is not None:  # torch.distributed inside torch.distributed (all_gather_object)
                return fn(*args, **kwargs)
            if name == "new_group":
                ranks = kwargs.get("ranks", args[0] if args else None)
                size = len(ranks) if ranks is not None else dist.get_world_size()
            else:
                size = dist.get_world_size(kwargs.get("group"))
            counter.inside = entry = Call("gradwatch", name, size)
            try:
                return fn(*args, **kwargs)
            finally:
                counter.inside = None
                counter.calls.append(entry)
        return call

    for name, fn in real.items():
        setattr(dist, name, wrap(name, fn))
    try:
        with _dispatch_mode(counter):
            yield counter.calls
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


# ---------------------------------------------------------------------------------------------- on paper
def _per_stage(n: int | Sequence[int], pp: int) -> list[int]:
    return [n] * pp if isinstance(n, int) else list(n)


def paper(n_tensors: int | Sequence[int], n_blocks: int | Sequence[int], layout: Layout, *, stage: int = 0,
          units: int | Sequence[int] | None = None, names_bytes: Sequence[int] = (), updates: bool = True,
          itemsize: int = 4) -> dict[str, list[Call]]:
    """The collectives one rank of pipeline stage ``stage`` makes in gradwatch's logging step, by gradwatch's
    rules, for a model of ``n_tensors`` measured tensors in ``units`` layers (default: one tensor each) and
    ``n_blocks`` residual merges, each per stage (a sequence) or one number for every stage; ``names_bytes``:
    each stage's pickled names (pipeline only); ``updates``: a Monitor given the optimizer
    (update_to_weight); ``itemsize``: 4 for a float32 model's norms (8 for a float64 model). Layouts with
    ``Partial`` gradients (tensor + sequence parallel without FSDP) would add one all_reduce of those
    gradients per group: none here. Returns the calls of the first logging step, a later one, and a step that
    does not log (none)."""
    pp, size = layout.pp, layout.stage_size
    tensors, blocks = _per_stage(n_tensors, pp), _per_stage(n_blocks, pp)
    layers = _per_stage(units, pp) if units is not None else tensors
    t, b = tensors[stage], blocks[stage]
    parts = 3 if updates else 2  # rows: grad², weight², update²
    vector = (parts * t + 4 * b) * itemsize  # ... and 4 flow norms per block (meter._join)
    # mesh dimensions the tensors are split along (norms.shard_dims): FSDP's shards and tensor parallel's;
    # HSDP's replicas hold copies
    split = [(n, d) for n, d in ((layout.shard, "shard"), (layout.tp, "tp")) if n > 1]
    sync = b > 0 and size > 1  # flow norms summed over the stage's ranks
    ride = sync and math.prod(n for n, _ in split) == size  # meter._covering: those dims are the stage's ranks
    later = [Call("gradwatch", "all_reduce", n, vector, f"norms over {d}" + (" (flow rides along)" if ride else ""))
             for n, d in split]
    if sync and not ride:  # reduce_squared's world_tail: the flow norms alone over the stage
        later.append(Call("gradwatch", "all_reduce", size, 4 * b * itemsize, "flow norms over the stage"))
    if pp > 1:  # Stages.merge: every stage's layers x metrics, 3 squared totals, blocks x 6; + the names flag
        metrics = 4 if updates else 3
        merged = sum(u * metrics + 3 + n * len(FLOW_METRICS) for u, n in zip(layers, blocks)) + 1
        later.append(Call("gradwatch", "all_reduce", layout.world, 8 * merged, "stages' records (float64)"))

    first = [Call("gradwatch", "all_gather", layout.world, 8, "Stages.find: 64-bit name fingerprint")]
    if pp > 1:  # one process group per stage, made by every rank (no data moves: not counted as a collective)
        first += [Call("gradwatch", "new_group", size, 0, "a stage's process group") for _ in range(pp)]
    if sync and layout.tp > 1:  # FlowWeights: replicated or split over each model-parallel dim (MAX, float64)
        first.append(Call("gradwatch", "all_reduce", layout.tp, 2 * 4 * b * 8, "flow: replicated over tp? (MAX)"))
    # the self-check: torch's total norm reduces the stacked per-tensor norms over each split dim ...
    first += [Call("torch", "all_reduce", n, itemsize * t, f"self-check: torch's total norm over {d}")
              for n, d in split]
    # ... and the verdict (2 float64): over the world when one mesh spans it, else over each of its dims
    dims = [n for n in (layout.replicate, layout.shard, layout.tp) if n > 1]
    verdict = [layout.world] if pp == 1 else dims
    first += [Call("gradwatch", "all_reduce", n, 16, "self-check verdict (MAX)") for n in verdict]
    if pp > 1:  # the first merge: each stage's names, broadcast by its first rank (size, then pickled names)
        first += [Call("gradwatch", "broadcast_object_list", layout.world, 8 + n, f"stage {i}'s names")
                  for i, n in enumerate(names_bytes)]
    return {"first": first + later, "later": later, "off": []}


def names_bytes(layers: int, pp: int) -> list[int]:
    """Each stage's names as ``broadcast_object_list`` pickles them (none without a pipeline)."""
    return [len(pickle.dumps(n)) for n in stage_names(layers, pp)] if pp > 1 else []


def predict(layers: int, layout: Layout, stage: int) -> dict[str, list[Call]]:
    """:func:`paper` for this file's Llama of ``layers`` layers."""
    names = stage_names(layers, layout.pp)
    return paper([len(n[0]) for n in names], [len(n[2]) for n in names], layout, stage=stage,
                 names_bytes=names_bytes(layers, layout.pp))


# ---------------------------------------------------------------------------------------------- measured
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, keys: list[str], out: str, queue) -> None:
    import logging
    import traceback
    import warnings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    logging.getLogger("gradwatch").setLevel(logging.WARNING)
    # torch's note that its own total norm over a 2-D mesh takes "2 sequential all_reduce operations": counted
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on the logits' view
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for key in keys:
            try:
                result = run(rank, LAYOUTS[key][0], os.path.join(out, key))
            except Exception as err:  # report it, go on with the next layout
                result = {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-2000:]}"}
            queue.put((key, rank, result))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run(rank: int, layout: Layout, log_dir: str) -> dict:
    """Three training steps of the Llama in ``layout``, the collectives around each ``optimizer.step()``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dims = [(n, d) for n, d in ((layout.pp, "pp"), (layout.replicate, "replicate"), (layout.shard, "shard"),
                                (layout.tp, "tp")) if n > 1 or d == "shard"]
    mesh = init_device_mesh("cpu", tuple(n for n, _ in dims), mesh_dim_names=tuple(d for _, d in dims))
    model = Llama()
    stage = mesh.get_local_rank("pp") if layout.pp > 1 else 0
    if layout.pp > 1:
        keep = {str(i) for i in range(stage * LAYERS // layout.pp, (stage + 1) * LAYERS // layout.pp)}
        for name in [n for n in model.layers if n not in keep]:
            del model.layers[name]  # the names stay the whole model's (torchtitan's split does the same)
        if stage > 0:
            model.tok_embeddings = None
        if stage < layout.pp - 1:
            model.norm = model.output = None
    if layout.tp > 1:
        tensor_parallel(model, mesh["tp"])
    dp_mesh = mesh["replicate", "shard"] if layout.replicate > 1 else mesh["shard"]
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    dp_rank = dp_mesh.get_coordinate()
    dp_rank, dp_size = (dp_rank[0] * layout.shard + dp_rank[-1] if len(dp_rank) > 1 else dp_rank[0],
                        layout.replicate * layout.shard)

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gradwatch.Monitor(model, optimizer=opt, every=2, strict=True, log_dir=log_dir)
    schedule = None
    if layout.pp > 1:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        def loss_fn(logits, target):
            return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

        piece = PipelineStage(model, stage, layout.pp, torch.device("cpu"), group=mesh.get_group("pp"))
        schedule = ScheduleGPipe(piece, n_microbatches=2, loss_fn=loss_fn)
    g = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(3):  # logs at steps 0 and 2 (every=2)
        idx, target = (torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(2))
        part = slice(BATCH // dp_size * dp_rank, BATCH // dp_size * (dp_rank + 1))
        if schedule is None:
            nn.functional.cross_entropy(model(idx[part]).flatten(0, 1), target[part].flatten()).backward()
        elif stage == 0:
            schedule.step(idx[part])
        elif stage == layout.pp - 1:
            schedule.step(target=target[part])
        else:
            schedule.step()
        with counted() as calls:
            opt.step()
        opt.zero_grad()
        steps.append([(c.who, c.name, c.ranks, c.bytes, c.ops) for c in calls])  # plain data for the queue
    mon.close()
    last = mon.records[-1]
    return {"stage": stage, "steps": steps, "verified": [r.verified for r in mon.records], "errors": mon.errors,
            "layers": len(last.layers), "blocks": len(last.blocks), "tensors": sum(1 for _ in model.parameters())}


def measure(keys: list[str]) -> dict[str, dict[int, dict]]:
    """Each layout's results by rank, from one start of 8 processes."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="gradwatch-collectives-") as out:
        mp.spawn(_worker, args=(_free_port(), keys, out, queue), nprocs=WORLD, join=True)
        results: dict[str, dict[int, dict]] = {}
        while not queue.empty():
            key, rank, result = queue.get()
            results.setdefault(key, {})[rank] = result
    return results


# ---------------------------------------------------------------------------------------------- report
STEPS = ("first", "off", "later")  # the order they are run: step 0 logs, step 1 does not, step 2 logs


def _collectives(calls: list[Call]) -> list[Call]:
    return [c for c in calls if c.name != "new_group"]


def _summary(calls: list[Call]) -> str:
    coll = _collectives(calls)
    groups = len(calls) - len(coll)
    return f"{len(coll):>3} {sum(c.bytes for c in coll):>9,} B" + (f" +{groups} groups" if groups else "")


def _list(calls: list[Call], paper_calls: list[Call] | None = None) -> list[str]:
    """One line per call; measured calls take the description of the first unused paper call like them."""
    unused = list(paper_calls or [])
    out = []
    for c in calls:
        twin = next((p for p in unused if p.key() == c.key()), None)
        if twin is not None:
            unused.remove(twin)
        what = c.what or (twin.what if twin is not None else "")
        out.append(f"      {c.who:<9} {c.name:<17} over {c.ranks:>4} ranks {c.bytes:>8,} B  {what}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    args = parser.parse_args()
    keys = args.layouts.split(",")
    t0 = time.perf_counter()
    results = measure(keys)
    print(f"torch {torch.__version__}, gradwatch {gradwatch.__version__}, {WORLD} gloo processes on "
          f"{os.cpu_count()} cores; a Llama of {LAYERS} layers (9 tensors, 2 merges each); Monitor(optimizer=opt, "
          "every=2, log_dir=...); collectives around optimizer.step(); bytes: what each rank puts in")
    mismatches = 0
    for key in keys:
        layout = LAYOUTS[key][0]
        ranks = results.get(key, {})
        errors = {r: res["error"] for r, res in ranks.items() if "error" in res}
        if errors or len(ranks) != WORLD:
            print(f"\n{layout.label}: FAILED ({len(ranks)} ranks reported)\n{next(iter(errors.values()), '')}")
            mismatches += 1
            continue
        for res in ranks.values():
            res["steps"] = [[Call(who, name, n, size, ops=ops) for who, name, n, size, ops in step]
                            for step in res["steps"]]
        zero = ranks[0]
        print(f"\n{layout.label}: {zero['tensors']} tensors on rank 0, record of {zero['layers']} layers and "
              f"{zero['blocks']} blocks; verified {zero['verified']}; errors {zero['errors'] or 'none'}")
        bad = []
        for rank, res in sorted(ranks.items()):
            want = predict(LAYERS, layout, res["stage"])
            for name, got in zip(STEPS, res["steps"]):
                if Counter(c.key() for c in got) != Counter(c.key() for c in want[name]):
                    bad.append((rank, name, got, want[name]))
        print(f"  {'step':<8} {'measured':<28} {'paper':<28} all {WORLD} ranks as on paper")
        for stage in range(layout.pp):  # the first rank of each pipeline stage (ranks differ by stage only)
            rank = min(r for r, res in ranks.items() if res["stage"] == stage)
            if layout.pp > 1:
                print(f"  stage {stage} (rank {rank}, {ranks[rank]['tensors']} tensors):")
            want = predict(LAYERS, layout, stage)
            for name, got in zip(STEPS, ranks[rank]["steps"]):
                same = not [b for b in bad if b[1] == name and ranks[b[0]]["stage"] == stage]
                print(f"  {name:<8} {_summary(got):<28} {_summary(want[name]):<28} {'yes' if same else 'NO'}")
        want = predict(LAYERS, layout, zero["stage"])
        print("    first logging step, rank 0, in order:")
        print("\n".join(_list(zero["steps"][0], want["first"])))
        for rank, name, got, exp in bad:
            mismatches += 1
            print(f"  rank {rank}, {name}: measured")
            print("\n".join(_list(got)))
            print("    paper:")
            print("\n".join(_list(exp)))

    print(f"\nOn paper: {PAPER_LAYERS} layers, {9 * PAPER_LAYERS + 3} tensors, {2 * PAPER_LAYERS} residual merges, "
          "float32 norms; per rank (under PP: the stage that sends most)")
    print(f"  {'layout (1,024 GPUs)':<30} {'later logging step':<28} {'first logging step':<28}")
    for key in keys:
        layout = LAYOUTS[key][1]
        stages = [predict(PAPER_LAYERS, layout, s) for s in range(layout.pp)]
        top = max(stages, key=lambda p: sum(c.bytes for c in p["later"]))
        print(f"  {layout.label:<30} {_summary(top['later']):<28} {_summary(top['first']):<28}")
    for key in ("fsdp_tp", "pp_fsdp_tp"):
        layout = LAYOUTS[key][1]
        stages = [predict(PAPER_LAYERS, layout, s) for s in range(layout.pp)]
        top = max(range(layout.pp), key=lambda s: sum(c.bytes for c in stages[s]["later"]))
        where = f", stage {top} of {layout.pp}" if layout.pp > 1 else ""
        print(f"    {layout.label}{where}, first logging step:")
        print("\n".join(_list(stages[top]["first"])))
    print(f"\n{time.perf_counter() - t0:.0f} s; {'all as on paper' if not mismatches else f'{mismatches} MISMATCHES'}")


if __name__ == "__main__":
    main()
