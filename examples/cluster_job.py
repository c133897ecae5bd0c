"""Submit a detection to a running Ray cluster as a job (the Python twin of cluster/submit.sh).

    ray up cluster/aws.yaml && ray dashboard cluster/aws.yaml        # or any cluster with a job server
    python examples/cluster_job.py --address http://127.0.0.1:8265 \
        s3://my-bucket/fm-badnet s3://my-bucket/runs/fm-badnet --preset small

The repository is uploaded as the job's working directory with cluster/runtime_env.yaml (code only: the
nodes' image holds the dependencies; cluster/Dockerfile) and the job runs examples/quickstart.py on the
cluster, so DATA and OUT are paths the cluster sees (a bucket, or a shared volume). The script follows
the job until it ends, prints its log and exits 0 only when it succeeded; ``--no-wait`` returns after
submitting (then: ``ray job logs --follow ID``), ``--dry-run`` prints the submission without sending it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def submission(data: str, out: str, preset: str | None, overrides: list[str]) -> dict[str, object]:
    """The job: examples/quickstart.py on the cluster, with cluster/runtime_env.yaml's upload rules."""
    with open(os.path.join(REPO, "cluster", "runtime_env.yaml")) as f:
        env = yaml.safe_load(f)
    env["working_dir"] = REPO  # runtime_env.yaml says "." = the repository
    words = ["python", "examples/quickstart.py", data, out, *(["--preset", preset] if preset else []), *overrides]
    return {"entrypoint": shlex.join(words), "runtime_env": env}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="the cluster's view of a directory with train-*.tar and clean-*.tar")
    p.add_argument("out", help="where the cluster writes the run (a bucket or a shared volume)")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
                   or "http://127.0.0.1:8265", help="the cluster's job server (dashboard) address")
    p.add_argument("--preset", default=None)
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config fields, as on the CLI")
    args = p.parse_intermixed_args()
    job = submission(args.data, args.out, args.preset, args.overrides)
    if args.dry_run:
        print(json.dumps({"address": args.address, **job}, indent=1))
        return 0

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    deadline = time.time() + 60
    while True:  # a just-started head's job agent registers a few seconds after its dashboard answers
        try:
            job_id = client.submit_job(**job)  # type: ignore[arg-type]
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
    print(f"submitted {job_id} to {args.address}")
    if args.no_wait:
        return 0
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(2)
    print(client.get_job_logs(job_id))
    print(f"job {job_id} {status.value.lower()}")
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
