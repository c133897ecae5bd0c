"""Shards and the run directory in an object store (s3://, gs://): nothing is copied to local disk.

    aws s3 cp --recursive data/fm-badnet s3://my-bucket/fm-badnet      # once: shards into the bucket
    python examples/s3_shards.py s3://my-bucket/fm-badnet s3://my-bucket/runs/fm-badnet

Credentials and the endpoint come from the environment as for any S3 client (an instance role on a cloud
cluster; AWS_ENDPOINT_URL for MinIO, Ceph or R2; on a cluster, name them in cluster/runtime_env.yaml so
the workers get them too). Ray Data's read tasks stream the tars from the bucket; every output
(scores.parquet, report.html, checkpoints, Ray Train's storage) goes to the run directory in the
bucket, and a rerun with the same run directory resumes from it. The cleansed shards are written back
to the bucket beside it. tests/test_s3.py runs this script against a real S3 server on loopback.
"""

from __future__ import annotations

import argparse
import logging

import ctray
from ctray.config import parse_overrides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="s3://bucket/prefix holding train-*.tar and clean-*.tar")
    p.add_argument("out", help="s3://bucket/prefix for the run directory and the cleansed shards")
    p.add_argument("--preset", default=None, help="default: chosen from the data")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config fields, as on the CLI")
    args = p.parse_intermixed_args()
    # progress on stderr (a rerun with the same OUT logs "resuming ...: k of n rounds already done")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ctray").setLevel(logging.INFO)
    data, out = args.data.rstrip("/"), args.out.rstrip("/")

    res = ctray.detect(f"{data}/train-*.tar", f"{data}/clean-*.tar", f"{out}/run", preset=args.preset,
                       overrides=parse_overrides(args.overrides))
    print(f"{res.n_flagged} of {res.n_usable} samples flagged; poisoned classes {res.cleansed_classes}")

    again = ctray.open_run(f"{out}/run")  # any machine with the credentials reads the results back
    print(f"run directory {again.run_dir}: {len(again.shards())} shards, {again.n_quarantined} quarantined")

    cleansed = ctray.export(res.run_dir, f"{out}/cleansed")
    print(f"wrote {cleansed.written} kept samples to {out}/cleansed ({cleansed.removed} removed)")


if __name__ == "__main__":
    main()
