"""Indexing on a Ray cluster: decode in CPU tasks, encode in an actor pool, one committer.

The run is ``indexing.pipeline.index_paths`` with its encode-and-commit stage swapped for a Ray
Data pipeline, so discovery, the identity check, "up to date" skipping, resume and the FAISS
refresh are the same code as in a single process::

    from_items(one row per source) ──flat_map──▶ pixel chunks ──map_batches(actors)──▶ vectors ──▶ driver
                         (CPU tasks: decode, sample, dedup, preprocess)  (Encoder per actor)   (commits)

* A decode task runs ``pipeline.read_source`` on one source: the same sampling, near-duplicate
  skipping and preprocessing as the threaded reader, in the same batches.
* Each encoder actor builds its own ``encoders.Encoder`` from the driver encoder's constructor
  arguments (``EncoderSpec``) and runs ``encode_image_tensor`` on one chunk at a time, so a chunk
  is encoded exactly as the single process encodes it.
* With ``--reuse`` (encoders/reuse.py) the frames of a source must reach one encoder in order, so
  the decode and encode stages become one: each actor reads a whole source itself (the same
  ``read_source``) and encodes its batches in order through its reuse stream; each source's reuse
  counters travel with its last chunk and the driver adds them up for the report.
* Only the driver writes the index. Chunks arrive in any order; the driver reassembles each source
  and commits finished sources **in the order ``discover`` listed them** (later ones wait in
  memory, ~4 bytes x dim per frame). The store hands out ids sequentially at commit, so the ids,
  rows and vectors do not depend on the worker count or on which worker finished first, and they
  equal the single-process run's. A killed run has committed a prefix of that order; the next run
  skips it (``IndexStore.is_current``) and gives the rest the same ids it would have had.
* Actors are restarted after a crash (``max_restarts``) and the lost chunk is encoded again
  (``max_task_retries``); decode tasks are retried (``max_retries``). When retries run out the run
  stops with one line saying what was committed; the same command resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from mergeseek.errors import ConfigError, IndexMismatchError, MergeseekError, RayRunError  # noqa: F401 (re-exported)
from mergeseek.indexing.pipeline import (
    IndexOptions,
    IndexReport,
    _Bars,
    _Batch,
    _Failed,
    _reuse_config,
    index_paths,
    read_source,
    take_source,
)
from mergeseek.indexing.sources import BadInput, MediaSource
from mergeseek.indexing.store import IDENTITY_KEYS
from mergeseek.indexing.writer import IndexWriter

log = logging.getLogger(__name__)

RAY_INSTALL = "pip install 'mergeseek[ray]'  (or: pip install 'ray[data]>=2.40')"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run.

    Args:
        address: ``local`` (start a Ray on this machine), ``auto`` (join the cluster this machine
            is part of, e.g. after ``ray start``) or a cluster address (``HOST:6379``,
            ``ray://HOST:10001``). An already initialised Ray (``ray.init`` by the caller) is used as is.
        workers: encoder actors (each holds one model; one GPU each when the cluster has GPUs).
        gpus_per_worker: GPUs per actor (None: 1 when the cluster has GPUs, else 0 = encode on CPU).
        cpus_per_worker: CPUs per CPU actor (None: share the cluster's CPUs, keeping one for decoding).
        decode_cpus: CPUs per decode task (one task per source).
        max_retries: restarts of a dead actor / retries of a lost task before the run stops.
        num_cpus: CPUs of a ``local`` Ray (None: what Ray detects, cgroup limits included).
    """

    address: str = "local"
    workers: int = 1
    gpus_per_worker: Optional[float] = None
    cpus_per_worker: Optional[float] = None
    decode_cpus: float = 1.0
    max_retries: int = 3
    num_cpus: Optional[int] = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers} is not valid; give at least 1 encoder actor")
        if not self.address or not self.address.strip():
            raise ConfigError("--ray needs a value: local, auto or a cluster address such as 10.0.0.1:6379")


@dataclass(frozen=True)
class EncoderSpec:
    """The constructor arguments of an ``encoders.Encoder``: how every actor builds the same encoder.

    ``kwargs`` are the encoder's dataclass fields except the device (each actor picks its own) and
    the loaded objects (model, transforms), so a new ``Encoder`` option travels without a change here.
    """

    kwargs: tuple  # ((name, value), ...)

    @classmethod
    def from_encoder(cls, encoder: Any) -> "EncoderSpec":
        import dataclasses

        skip = {"device", "model", "preprocess", "tokenizer"}
        kw = {f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder) if f.init and f.name not in skip}
        if "merge" in kw:
            kw["merge"] = str(kw["merge"])
        return cls(tuple(sorted(kw.items())))

    def __call__(self, device: str):
        from mergeseek.encoders import Encoder

        return Encoder(device=device, **dict(self.kwargs))


@dataclass
class _Chunk:
    """One hand-off between the stages: an item of ``read_source`` and, once encoded, its vectors."""

    order: int  # the source's position in the run's to-do list (discover order)
    chunk: int  # position within the source
    item: Any  # _Batch, _Done or _Failed
    vectors: Any = None
    read_s: float = 0.0
    encode_s: float = 0.0
    reuse: Any = None  # --reuse: the source's ReuseStats, on its last chunk


class _Preprocess:
    """``Encoder.preprocess_images`` with only the transform (picklable; no model travels to decode tasks)."""

    def __init__(self, transform: Callable):
        self.preprocess = transform

    def __call__(self, images):
        from mergeseek.encoders import Encoder

        return Encoder.preprocess_images(self, images)


# ---------------------------------------------------------------------------- Ray stages
def _decode_rows(row: dict, sampling, dedup, preprocess, batch_size: int, decoder: str):
    """flat_map: one source row -> its chunks (pickled), the last one being _Done or _Failed."""
    src = pickle.loads(row["source"])
    t0 = time.perf_counter()
    for n, item in enumerate(read_source(src, sampling, dedup, preprocess, batch_size, decoder=decoder)):
        chunk = _Chunk(row["order"], n, item, read_s=time.perf_counter() - t0)
        yield {"payload": pickle.dumps(chunk, protocol=5)}
        t0 = time.perf_counter()


class _EncodeActor:
    """map_batches actor: holds one ``Encoder`` and encodes each chunk as one forward pass."""

    def __init__(self, factory: Callable, identity: dict, device: str, threads: int):
        import torch

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.encoder = factory(device)
        got = self.encoder.describe()
        diffs = [k for k in IDENTITY_KEYS if str(got.get(k)) != str(identity.get(k))]
        if diffs:  # a stale image on one node, or a factory that disagrees with the driver
            raise IndexMismatchError(
                "encoder actor built " + ", ".join(f"{k}={got.get(k)}" for k in diffs) + " but the run indexes with "
                + ", ".join(f"{k}={identity.get(k)}" for k in diffs) + "; install the same mergeseek and weights on every node"
            )

    def __call__(self, batch):
        import pyarrow as pa

        out = []
        for payload in batch.column("payload").to_pylist():
            chunk: _Chunk = pickle.loads(payload)
            item = chunk.item
            if isinstance(item, _Batch) and item.pixels is not None:
                t0 = time.perf_counter()
                chunk.vectors = self.encoder.encode_image_tensor(item.pixels).cpu().numpy()
                chunk.encode_s = time.perf_counter() - t0
                item.pixels = None  # the driver needs the vectors, not the pixels
            out.append(pickle.dumps(chunk, protocol=5))
        return pa.table({"payload": pa.array(out, pa.binary())})


class _ReadEncodeActor(_EncodeActor):
    """map_batches actor for ``--reuse``: reads each source it is given (``read_source``) and
    encodes its batches in order through one reuse stream, whose cache of a source is dropped at
    the source's end. Yields each chunk as it is encoded (a long video is never held whole)."""

    def __init__(self, factory: Callable, identity: dict, device: str, threads: int, reuse: str, read: dict):
        super().__init__(factory, identity, device, threads)
        self.stream = self.encoder.stream(reuse)
        self.read = read  # read_source's sampling, dedup, preprocess, batch_size, decoder

    def __call__(self, batch):
        import pyarrow as pa

        for row in batch.to_pylist():
            src: MediaSource = pickle.loads(row["source"])
            # A source retried on this actor (a failed attempt) starts clean: no cache, no counts.
            self.stream.end(src.key)
            self.stream.take_stats()
            t0 = time.perf_counter()
            for n, item in enumerate(read_source(src, **self.read)):
                chunk = _Chunk(row["order"], n, item, read_s=time.perf_counter() - t0)
                if isinstance(item, _Batch) and item.pixels is not None:
                    t1 = time.perf_counter()
                    keys = [src.key] * int(item.pixels.shape[0])
                    chunk.vectors = self.stream.encode_image_tensor(item.pixels, keys).cpu().numpy()
                    chunk.encode_s = time.perf_counter() - t1
                    item.pixels = None
                elif not isinstance(item, _Batch):  # _Done or _Failed: the source is over
                    self.stream.end(src.key)
                    chunk.reuse = self.stream.take_stats()
                yield pa.table({"payload": pa.array([pickle.dumps(chunk, protocol=5)], pa.binary())})
                t0 = time.perf_counter()


# ---------------------------------------------------------------------------- connecting
def connect(address: str, num_cpus: Optional[int] = None) -> bool:
    """Initialise Ray for ``address``; returns True when this call started it (so it shuts it down)."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray Data, which is not installed; {RAY_INSTALL}") from None
    if ray.is_initialized():
        return False
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, **kwargs)  # None: Ray counts the CPUs this process may use (cgroups)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = ("start one with `ray start --head` on this machine, or use --ray local" if address == "auto"
                else "check the address (`ray status` on the head node prints it) and that this machine can reach it")
        raise RayRunError(f"cannot connect to Ray at {address!r} ({str(exc).strip().splitlines()[-1][:160]}); {hint}") from None
    return True


def _resources(ray_opts: RayOptions) -> tuple[float, float, int, str]:
    """(cpus, gpus, torch threads, device) of one encoder actor on the connected cluster."""
    import ray

    total = ray.cluster_resources()
    cpus_total, gpus_total = float(total.get("CPU", 1)), float(total.get("GPU", 0))
    gpus = ray_opts.gpus_per_worker if ray_opts.gpus_per_worker is not None else (1.0 if gpus_total >= 1 else 0.0)
    if gpus > 0:
        if gpus_total < gpus:
            raise ConfigError(f"gpus_per_worker={gpus:g} but the cluster has {gpus_total:g} GPU(s); use --device cpu")
        return 1.0, gpus, 1, "cuda"
    if ray_opts.cpus_per_worker is not None:
        cpus = float(ray_opts.cpus_per_worker)
    else:
        # Leave room for at least one decode task: actors that take every CPU would starve the decoders.
        spare = max(cpus_total - ray_opts.decode_cpus, 0.0)
        cpus = math.floor(spare / ray_opts.workers) if spare >= ray_opts.workers else max(spare / ray_opts.workers, 0.1)
    return cpus, 0.0, max(1, int(cpus)), "cpu"


# ---------------------------------------------------------------------------- the run
def index_paths_ray(
    paths: Sequence[Union[str, Path]],
    index_dir: Union[str, Path],
    encoder: Any,
    options: IndexOptions = IndexOptions(),
    ray_options: RayOptions = RayOptions(),
    on_commit: Optional[Callable[[list], None]] = None,
    actor_encoder: Optional[Callable[[str], Any]] = None,
) -> IndexReport:
    """``indexing.index_paths`` on Ray: same arguments, same index, same report.

    Args:
        encoder: an ``encoders.Encoder`` (or a zero-argument callable returning one) used by the
            driver for the index identity and the preprocessing transform; load it on CPU.
        ray_options: cluster address and actor count (see ``RayOptions``).
        actor_encoder: ``device -> Encoder`` run once in each actor (picklable; default: the
            driver encoder's constructor arguments, ``EncoderSpec``). Its ``describe()`` must match.

    Raises:
        RayRunError: Ray could not be reached, or workers died past their retries (what was
            committed is kept; run again to resume).
    """
    if options.ocr or options.asr:  # the text channels' stages are not Ray stages: indexing.text.ensure_text reads them
        log.warning("--ocr/--asr with --ray: on-screen text and speech are read on this machine after the vectors are "
                    "committed (the frames decoded again), not by the Ray workers")
    started = connect(ray_options.address, ray_options.num_cpus)
    try:
        def stages(writer, todo, enc, opts, report):
            return _ray_stages(writer, todo, enc, opts, report, ray_options, actor_encoder)

        return index_paths(paths, index_dir, encoder, options, on_commit=on_commit, stages=stages)
    finally:
        if started:
            import ray

            ray.shutdown()


def _dataset(todo: Sequence[MediaSource], encoder, options: IndexOptions, ray_options: RayOptions, actor_encoder):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(options.progress)
    ctx.verbose_stats_logs = False
    rows = [{"order": i, "source": pickle.dumps(s, protocol=5)} for i, s in enumerate(todo)]
    reuse = _reuse_config(options)
    # --reuse: the actors decode too (no decode tasks to leave CPUs for)
    cpus, gpus, threads, device = _resources(dataclasses.replace(ray_options, decode_cpus=0.0) if reuse else ray_options)
    log.info("ray: %d encoder actor(s) with %g CPU / %g GPU each on %s", ray_options.workers, cpus, gpus, device)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # one decode task per source
    with warnings.catch_warnings():
        # Retry counts go through ``ray_remote_args`` (deprecated in 2.60, no named replacement yet).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=Warning)
        return _stages_on(ds, encoder, options, ray_options, actor_encoder, (cpus, gpus, threads, device))


def _stages_on(ds, encoder, options, ray_options: RayOptions, actor_encoder, resources):
    import ray

    cpus, gpus, threads, device = resources
    actor_kwargs = {"factory": actor_encoder or EncoderSpec.from_encoder(encoder), "identity": encoder.describe(),
                    "device": device, "threads": threads}
    common = {"batch_size": 1, "batch_format": "pyarrow", "compute": ray.data.ActorPoolStrategy(size=ray_options.workers),
              "num_cpus": cpus, "num_gpus": gpus, "max_restarts": ray_options.max_retries,
              "max_task_retries": ray_options.max_retries}
    reuse = _reuse_config(options)
    if reuse is not None:  # one stage: each actor reads its sources and encodes them in order
        read = {"sampling": options.sampling, "dedup": options.dedup, "preprocess": _Preprocess(encoder.preprocess),
                "batch_size": encoder.batch_size, "decoder": getattr(options, "decoder", "decord")}
        return ds.map_batches(_ReadEncodeActor, fn_constructor_kwargs={**actor_kwargs, "reuse": str(reuse), "read": read},
                              **common)
    ds = ds.flat_map(
        _decode_rows,
        fn_kwargs={"sampling": options.sampling, "dedup": options.dedup,
                   "preprocess": _Preprocess(encoder.preprocess), "batch_size": encoder.batch_size,
                   "decoder": getattr(options, "decoder", "decord")},
        num_cpus=ray_options.decode_cpus,
        max_retries=ray_options.max_retries,
    )
    return ds.map_batches(_EncodeActor, fn_constructor_kwargs=actor_kwargs, **common)


class _Assembler:
    """Collects chunks per source and releases finished sources in to-do order."""

    def __init__(self, todo: Sequence[MediaSource]):
        self.todo = list(todo)
        self.parts: dict = {}  # order -> {chunk: (_Batch, vectors)}
        self.last: dict = {}  # order -> (chunk number of the terminal item, item)
        self.next = 0

    def add(self, c: _Chunk) -> None:
        if isinstance(c.item, _Batch):
            self.parts.setdefault(c.order, {})[c.chunk] = (c.item, c.vectors)
        else:
            self.last[c.order] = (c.chunk, c.item)

    def ready(self):
        """Yield (source, terminal item or None, [(batch, vectors)] in chunk order) for the next finished sources."""
        while self.next < len(self.todo):
            i = self.next
            if i not in self.last or len(self.parts.get(i, ())) != self.last[i][0]:
                return
            parts = self.parts.pop(i, {})
            yield self.todo[i], self.last.pop(i)[1], [parts[k] for k in sorted(parts)]
            self.next += 1

    def abandon(self):
        """After the stream ended: the sources that never finished (their chunks were lost)."""
        while self.next < len(self.todo):
            i = self.next
            if i in self.last and len(self.parts.get(i, ())) == self.last[i][0]:
                parts = self.parts.pop(i, {})
                yield self.todo[i], self.last.pop(i)[1], [parts[k] for k in sorted(parts)]
            else:
                self.parts.pop(i, None)
                yield self.todo[i], None, []
            self.next += 1


def _ray_stages(writer: IndexWriter, todo: list, encoder, options: IndexOptions, report: IndexReport,
                ray_options: RayOptions, actor_encoder) -> None:
    assembler = _Assembler(todo)  # sources reach the writer (the same one as in one process) in to-do order
    bars = _Bars(len(todo)) if options.progress else None
    reuse_stats = None  # --reuse: the sources' ReuseStats added up, in arrival order

    def take(src: MediaSource, last, parts: list) -> None:
        # The bookkeeping of pipeline._run_stages, applied in to-do order so the report matches too.
        for batch, _ in parts:
            writer.thumbs.add(src.key, batch.thumbs)
        if last is None or isinstance(last, _Failed):
            writer.drop(src.key)
        if last is None:
            report.failed.append(BadInput(str(src.path), "lost on the Ray cluster (its worker failed past the retries)"))
        elif isinstance(last, _Failed):
            report.failed.append(BadInput(str(last.source.path), last.reason.split(": ", 1)[-1]))
        else:
            take_source(writer, report, options, last, parts)
        if bars:
            bars.source_done()
        writer.commit_if_due()

    try:
        for block in _dataset(todo, encoder, options, ray_options, actor_encoder).iter_batches(
            batch_size=None, batch_format="pyarrow"
        ):
            for payload in block.column("payload").to_pylist():
                c: _Chunk = pickle.loads(payload)
                report.times.read_s += c.read_s
                report.times.encode_s += c.encode_s
                if isinstance(c.item, _Batch):
                    report.frames_sampled += c.item.sampled
                    report.frames_encoded += 0 if c.vectors is None else len(c.vectors)
                    if bars:
                        bars.frames(c.item.sampled)
                if c.reuse is not None and reuse_stats is None:
                    reuse_stats = c.reuse
                elif c.reuse is not None:
                    reuse_stats.merge(c.reuse)
                assembler.add(c)
            for src, last, parts in assembler.ready():
                take(src, last, parts)
        for src, last, parts in assembler.abandon():
            take(src, last, parts)
        writer.flush()
    except Exception as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(exc, MergeseekError) and isinstance(cause, MergeseekError) and cause is not exc:
            raise cause from None  # Ray's RayTaskError(IndexMismatchError) wrapper: the plain one-line error
        if isinstance(exc, MergeseekError):
            raise
        if _is_ray_error(exc):
            for src, last, parts in assembler.ready():  # finished and in order: keep them
                take(src, last, parts)
            writer.flush()
            kept = writer.manifest.counts()
            raise RayRunError(
                f"Ray run stopped ({_short(exc)}); kept {len(report.indexed)} source(s) of this run committed "
                f"({kept['videos']} sources, {kept['vectors']} vectors in {writer.root}); run the same command "
                "again to resume"
            ) from None
        raise
    finally:
        if bars:
            bars.close()
    reuse = _reuse_config(options)
    if reuse is not None:
        from mergeseek.encoders.reuse import ReuseStats

        stats = reuse_stats if reuse_stats is not None else ReuseStats()
        report.reuse = {"config": str(reuse), "audit_every": reuse.audit, **stats.summary()}


def _is_ray_error(exc: BaseException) -> bool:
    mod = type(exc).__module__ or ""
    return mod.startswith("ray") or "ray" in type(exc).__name__.lower()


def _short(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MergeseekError):
        return str(cause)
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1][:200] if lines else ''}"
