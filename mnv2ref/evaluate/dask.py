"""The Dask engine: shards of the image list evaluated on a cluster's workers.

    --dask local:N            a distributed.LocalCluster of N worker processes
                              (one thread each) on this machine
    --dask tcp://HOST:PORT    the workers of an existing scheduler
                              (`dask scheduler` + `dask worker tcp://HOST:PORT` on each machine)

Each shard (a few batches of images) is one task: the worker decodes and
preprocesses its images with `pipeline.load_samples`, predicts with the model
it loaded on its first shard (`_classifiers` is cached per process, keyed by
the weights' path) and returns the per-image records, which the client
writes as they arrive. The workers must see the images and the weights at
the same paths as the client (a shared file system). The records are those
of the single-machine engine: same preprocessing, same kernels, and no
image's result depends on which others share its batch.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from typing import Iterator, List, Sequence

from ..errors import InputError, MissingDependencyError
from .pipeline import chunks, interrupts_ignored, load_samples

#: Batches per shard: large enough to amortize a task's overhead (~ms),
#: small enough that an interrupted run loses little.
BATCHES_PER_SHARD = 8


def _distributed():
    try:
        import distributed
    except ImportError:
        raise MissingDependencyError('the Dask engine needs dask and distributed: '
                                     'pip install "mnv2ref[dask]"') from None
    return distributed


@contextmanager
def connect(address: str):
    """A `distributed.Client` for ``local:N`` (a new LocalCluster, closed on
    exit) or a scheduler address; yields (client, threads per task)."""
    distributed = _distributed()
    if address.startswith("local:"):
        count = address.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise InputError(f"--dask local:N needs a positive number of workers, got {address!r}")
        with interrupts_ignored():  # inherited by the worker processes: Ctrl-C is the client's
            cluster = distributed.LocalCluster(n_workers=int(count), threads_per_worker=1, processes=True,
                                               dashboard_address=None, silence_logs=logging.ERROR)
        with cluster, distributed.Client(cluster) as client:
            yield client, 1  # N processes on this machine: one Numba thread each
        return
    if "://" not in address:
        raise InputError(f"--dask expects local:N or a scheduler address such as "
                         f"tcp://host:8786, got {address!r}")
    try:
        client = distributed.Client(address, timeout=30)
    except OSError as error:
        raise InputError(f"cannot reach the Dask scheduler at {address}: {error}") from None
    with client:
        yield client, None


def run_dask(address: str, samples: Sequence, job, batch_size: int) -> Iterator[List[dict]]:
    """The records of `samples`, one list per shard as shards finish."""
    shards = chunks(samples, batch_size * BATCHES_PER_SHARD)
    for _, records in _run(address, job, evaluate_shard, [(shard, batch_size) for shard in shards]):
        yield records


def run_dask_shards(address: str, pending: Sequence, job, batch_size: int) -> Iterator[tuple]:
    """`shards.embed_shards` on Dask: (shard number, images read, embeddings,
    skipped) for each (shard number, images) of `pending`, as they finish."""
    from .shards import embed_shard

    tasks = [(images, batch_size) for _, images in pending]
    for position, result in _run(address, job, embed_shard, tasks):
        yield (pending[position][0], *result)


def _run(address: str, job, function, tasks: Sequence[tuple]) -> Iterator[tuple]:
    """Run `function(job, *task)` for every task on the cluster at `address`;
    yield (position of the task, its result) as each finishes."""
    distributed = _distributed()
    with connect(address) as (client, threads):
        job = dataclasses.replace(job, threads=threads)
        futures = {client.submit(function, job, *task, pure=False): position
                   for position, task in enumerate(tasks)}
        try:
            for future in distributed.as_completed(list(futures)):
                yield futures[future], future.result()
                future.release()
        finally:
            client.cancel(list(futures))


def evaluate_shard(job, shard: Sequence, batch_size: int) -> List[dict]:
    """On a worker: the records of one shard, batch by batch."""
    records = []
    for part in chunks(shard, batch_size):
        records += job.records(*load_samples(part, job.size))
    return records
