#!/usr/bin/env python
"""Run ``ctquant batch`` on a Dask cluster: an existing scheduler, a local demo cluster, or SLURM.

Needs the Dask extra: ``pip install 'ctquant[dask]'`` (on the client AND on every worker, with the
same ctquant version).

1. A cluster of your own machines (the usual case)::

       # on the scheduler node
       dask scheduler                       # prints: Scheduler at tcp://10.0.0.5:8786
       # on every compute node; one single-threaded worker per GPU or per few cores is a good start
       dask worker tcp://10.0.0.5:8786 --nworkers 2 --nthreads 1 --memory-limit 16GB
       # from any machine that sees the same paths
       ctquant batch /shared/trial/manifest.csv --out /shared/trial/results --scheduler tcp://10.0.0.5:8786
       # or, equivalently, this script
       python scripts/dask_cluster_example.py /shared/trial/manifest.csv --out /shared/trial/results \\
           --scheduler tcp://10.0.0.5:8786

2. A local demo cluster (no setup; what the tests do)::

       python scripts/dask_cluster_example.py manifest.csv --out results --local-workers 2

3. SLURM / PBS / SGE with ``dask-jobqueue`` (not a ctquant dependency; install it yourself)::

       from dask_jobqueue import SLURMCluster
       cluster = SLURMCluster(cores=4, memory="16GB", processes=1, walltime="02:00:00",
                              job_extra_directives=["--gres=gpu:1"])
       cluster.scale(jobs=8)
       # then pass cluster.scheduler_address as --scheduler, or a Client(cluster) as below

**Shared paths.** Tasks carry absolute paths: every worker must see the manifest's inputs, the model
file (``models/lesion_model.pt`` of the client's install) and the output folder under the *same*
paths as the machine that runs ``ctquant batch`` (an NFS/Lustre/GPFS mount at the same place).
Results are written by the workers, atomically, into ``OUT/scans/<subject>/<timepoint>/``;
``cohort.csv``, ``failures.csv`` and the endpoint report are written by the client at the end.
Each worker process loads the lesion model once and keeps it for all its scans.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("--out", required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    where.add_argument("--local-workers", type=int, help="start a local Dask cluster of this many worker processes")
    parser.add_argument("--method", default="model", choices=("model", "hu"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--config", default=None, help="YAML overriding configs/quantify.yaml")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from ctquant.run.batch import DaskExecutor, make_progress
    from ctquant.trial.endpoints import run_cohort  # ctquant batch: the scans, then the endpoint report

    if args.scheduler:
        client = Client(args.scheduler, timeout=30)
    else:
        # processes=True: one Python process per worker, as on a real cluster
        client = Client(LocalCluster(n_workers=args.local_workers, threads_per_worker=1, processes=True,
                                     dashboard_address=None))
    try:
        print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        summary = run_cohort(args.manifest, args.out, method=args.method, device=args.device,
                             config_path=args.config, force=args.force, executor=DaskExecutor(client=client),
                             progress=make_progress())
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None and not args.scheduler:
            cluster.close()
    print(f"{summary.counts}; cohort table {summary.cohort_csv}", file=sys.stderr)
    return 8 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
