"""cluster/: the launcher configs validate against the autoscaler schema the installed Ray ships, the
KubeRay RayJob has the structure the operator needs, the runtime_env is lean, submit.sh works."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(REPO, "cluster")
LAUNCHERS = ["aws.yaml", "gcp.yaml"]


def _load(name: str) -> dict:
    with open(os.path.join(CLUSTER, name)) as f:
        return yaml.safe_load(f)


def _ray_schema() -> dict:
    import ray.autoscaler

    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_validates_against_rays_schema(name):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(name)
    jsonschema.validate(cfg, _ray_schema())  # the file as written
    validate_config(prepare_config(cfg))  # and as `ray up` sees it: merged with the provider's defaults


def test_schema_check_catches_mistakes():
    """The validation above is not vacuous: typical slips in these files are rejected."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _load("aws.yaml")
    bad["available_node_types"]["gpu"]["min_worker"] = 0  # typo'd key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())
    bad = _load("aws.yaml")
    bad["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5  # resources must be integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())
    bad = _load("gcp.yaml")
    bad["head_node_type"] = "driver"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_shape(name):
    import ray

    cfg = _load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers only
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1  # autoscales from 0
    cpu = [n for n, t in types.items() if n != cfg["head_node_type"] and not t["resources"].get("GPU")]
    assert len(cpu) == 1 and types[cpu[0]]["min_workers"] == 0 and types[cpu[0]]["resources"]["CPU"] >= 4
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != cfg["head_node_type"]) <= cfg["max_workers"]
    # the same Ray and Python everywhere: the image tag names the installed Ray
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    setup = " ".join(cfg["setup_commands"])
    assert "-c /home/ray/ctray/constraints-gpu.txt" in setup and "[vision]" in setup
    assert ".venv" in cfg["rsync_exclude"] and "data" in cfg["rsync_exclude"]
    text = open(os.path.join(CLUSTER, name)).read().lower()
    assert "secret" not in text and "aws_access_key" not in text  # identity from the instance, not files


def test_gcp_gpu_nodes_have_accelerators_and_terminate_on_maintenance():
    gpu = _load("gcp.yaml")["available_node_types"]["gpu"]["node_config"]
    assert gpu["guestAccelerators"][0]["acceleratorCount"] == 1
    assert {"onHostMaintenance": "TERMINATE"} in gpu["scheduling"]


def test_kuberay_rayjob_structure():
    import ray

    job = _load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "ctray.cli", "detect"]
    assert {"--train", "--clean", "--out"} <= set(argv) and "scale.use_gpu=true" in argv
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) == {"env_vars"}  # no pip, no working_dir: the image carries the code
    assert env["env_vars"]["ARROW_DEFAULT_MEMORY_POOL"] == "jemalloc"  # ctray.memory
    rc = spec["rayClusterSpec"]
    assert rc["rayVersion"] == ray.__version__
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["authOptions"]["mode"] == "token"
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    hc = head["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in hc["ports"]} >= {6379, 8265, 10001}
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for g in groups.values():
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1 and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert "rayStartParams" in g
    for tmpl in [head["template"], *(g["template"] for g in groups.values())]:
        c = tmpl["spec"]["containers"][0]
        assert c["image"] == hc["image"]  # one image for the whole cluster
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
        assert "emptyDir" in vols[mounts["/tmp/ray"]]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_runtime_env_uploads_code_without_venv_or_data():
    from ray.runtime_env import RuntimeEnv

    env = _load("runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    assert {".venv/", "data/", "runs/", ".git/"} <= set(env["excludes"])
    assert not {"pip", "conda", "uv"} & set(env)  # dependencies are baked in (ray-notes §5.7)
    assert not any("SECRET" in k or "ACCESS_KEY" in k for k in env.get("env_vars", {}))
    assert env["env_vars"]["ARROW_DEFAULT_MEMORY_POOL"] == "jemalloc"  # every worker: ctray.memory


def test_dockerfile_uses_installed_ray_and_gpu_constraints():
    import ray

    text = open(os.path.join(CLUSTER, "Dockerfile")).read()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in text
    assert '-c constraints-gpu.txt -e ".[vision]"' in text


def _submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(CLUSTER, "submit.sh"), *args], capture_output=True, text=True,
                          timeout=30, env=env)


def test_submit_script_syntax_help_and_dry_run():
    assert subprocess.run(["bash", "-n", os.path.join(CLUSTER, "submit.sh")]).returncode == 0
    h = _submit("--help")
    assert h.returncode == 0 and "ray job submit" in h.stdout and "COMMAND" in h.stdout
    args = ["detect", "--train", "s3://b/train-{000000..000009}.tar", "--clean", "/d/clean-*.tar", "--out",
            "s3://r/run-$USER", "ct.lam=[20,15]", "scale.num_workers=4"]
    d = _submit("--dry-run", "--address", "http://10.0.0.5:8265", *args)
    assert d.returncode == 0, d.stderr
    argv = shlex.split(d.stdout)
    assert argv[:5] == ["ray", "job", "submit", "--address", "http://10.0.0.5:8265"]
    assert argv[argv.index("--working-dir") + 1] == REPO
    assert argv[argv.index("--runtime-env") + 1] == os.path.join(CLUSTER, "runtime_env.yaml")
    entry = argv[argv.index("--") + 1:]
    assert entry[:3] == ["python", "-m", "ctray.cli"]
    # ray job submit quotes the words with shlex.join for the head's shell: every argument arrives as given
    assert shlex.split(shlex.join(entry))[3:] == args
    spaced = _submit("--dry-run", "detect", "--out", "/runs/my run")
    assert shlex.split(spaced.stdout)[-1] == "/runs/my run"
    env = dict(os.environ, RAY_API_SERVER_ADDRESS="http://head:8265")
    assert shlex.split(_submit("--dry-run", "sweep", env=env).stdout)[4] == "http://head:8265"
    assert _submit().returncode == 2
    assert _submit("--bogus", "detect").returncode == 2
