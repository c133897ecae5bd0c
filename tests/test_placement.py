"""Ray Train worker requests are sized from the nodes that can host a worker, never from the driver's
machine: the rule on described clusters (the shipped cluster configs among them), and one real fit placed
on the session node through a custom accelerator-like resource."""

from __future__ import annotations

import os
import time

import pytest
import yaml
from conftest import TEST_ACCEL

from ctray.config import load_config, parse_overrides
from ctray.core.placement import NodeShape, PlacementError, plan_workers
from ctray.engine.cluster import alive_node_shapes, launcher_node_types
from ctray.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fits(req: dict[str, float], res) -> bool:
    return all(res.get(k, 0) >= v for k, v in req.items())


def _hosted_somewhere(plan, shapes) -> bool:
    return any(s.resources is not None and _fits(plan.resources, s.resources) for s in shapes)


def _cluster(name: str) -> list[NodeShape]:
    with open(os.path.join(REPO, "cluster", name)) as f:
        return launcher_node_types(yaml.safe_load(f))


# --------------------------------------------------------------------------------- described clusters


def test_gpu_workers_fit_the_gpu_nodes_not_the_drivers_head():
    """The issue's case: a head of 8 CPUs (where the driver runs) and GPU nodes of 4 CPUs + 1 GPU. The
    old rule asked {CPU: 8, GPU: 1} once the CPU group scaled up: no node has it."""
    shapes = [NodeShape("head", {"CPU": 8}, alive=1),
              NodeShape("gpu", {"CPU": 4, "GPU": 1}, can_launch=True),
              NodeShape("cpu", {"CPU": 16}, alive=2, can_launch=True)]
    plan = plan_workers(shapes, 4, use_gpu=True)
    assert plan.resources == {"CPU": 3.0, "GPU": 1.0}  # 4 CPUs less Ray Data's max(0.5, 25%) = 1
    assert plan.hosts == ["gpu"] and plan.threads == 3
    assert _fits(plan.resources, shapes[1].resources) and not _fits(plan.resources, shapes[0].resources)


@pytest.mark.parametrize("name, cpus", [("aws.yaml", 3.0), ("gcp.yaml", 6.0)])
def test_shipped_launcher_configs_get_requests_their_gpu_nodes_hold(name, cpus):
    shapes = _cluster(name)
    head = [s for s in shapes if s.resources == {"CPU": 0}]
    assert head and not head[0].can_launch  # the head type is never launched by the autoscaler
    plan = plan_workers(shapes, 8, use_gpu=True)
    assert plan.resources == {"CPU": cpus, "GPU": 1.0} and plan.hosts == ["gpu"]
    assert _hosted_somewhere(plan, [s for s in shapes if s.name == "gpu"])


def test_kuberay_manifest_groups_get_requests_their_pods_hold():
    """KubeRay publishes its worker groups to the GCS cluster config; here they are read from the
    manifest's container limits, as the operator turns them into Ray resources."""
    with open(os.path.join(REPO, "cluster", "kuberay-rayjob.yaml")) as f:
        spec = yaml.safe_load(f)["spec"]["rayClusterSpec"]
    shapes = [NodeShape("head", {"CPU": float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])}, alive=1)]
    for g in spec["workerGroupSpecs"]:
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        res = {"CPU": float(lim["cpu"])}
        if "nvidia.com/gpu" in lim:
            res["GPU"] = float(lim["nvidia.com/gpu"])
        shapes.append(NodeShape(g["groupName"], res, can_launch=g["maxReplicas"] > 0))
    plan = plan_workers(shapes, 4, use_gpu=True)
    assert plan.resources == {"CPU": 6.0, "GPU": 1.0} and plan.hosts == ["gpu"]


def test_cpu_only_clusters_spread_over_alive_nodes_and_fit_one_node():
    two = [NodeShape("alive", {"CPU": 16}, alive=2)]
    assert plan_workers(two, 4).resources == {"CPU": 6.0}  # (2 x (16 - 4)) / 4
    assert plan_workers(two, 1).resources == {"CPU": 12.0}  # never more than one node minus Data's share
    # nothing alive can host yet (autoscaling from 0): one node type's worth, so the autoscaler can help
    scaling = [NodeShape("head", {"CPU": 0}, alive=1), NodeShape("cpu", {"CPU": 16}, can_launch=True)]
    assert plan_workers(scaling, 3).resources == {"CPU": 12.0}
    # CPU workers stay off GPU nodes while CPU nodes exist (Ray's scheduler does the same)
    mixed = [NodeShape("gpu", {"CPU": 4, "GPU": 1}, alive=1), NodeShape("cpu", {"CPU": 16}, alive=1)]
    assert plan_workers(mixed, 1).hosts == ["cpu"]
    assert plan_workers([mixed[0]], 1).resources == {"CPU": 3.0}  # only GPU nodes: CPU workers use them


def test_the_two_cpu_laptop_keeps_data_room():
    """The 2-CPU deadlock fix: Ray Data keeps 0.5 CPU whatever the worker count."""
    laptop = [NodeShape("alive", {"CPU": 2}, alive=1)]
    assert plan_workers(laptop, 1).resources == {"CPU": 1.5}
    assert plan_workers(laptop, 2).resources == {"CPU": 0.75}
    assert plan_workers(laptop, 8).resources == {"CPU": 0.25}  # the floor (more workers than CPUs)
    assert plan_workers(laptop, 1).threads == 1 and plan_workers(laptop, 2).threads == 1


def test_multi_gpu_and_fractional_gpu_nodes():
    assert plan_workers([NodeShape("p4", {"CPU": 32, "GPU": 4}, alive=1)], 8, use_gpu=True).resources == \
        {"CPU": 6.0, "GPU": 1.0}  # (32 - 8) / 4 workers a node
    half = plan_workers([NodeShape("g", {"CPU": 8, "GPU": 1}, alive=1)], 2, use_gpu=True, gpus_per_worker=0.5)
    assert half.resources == {"CPU": 3.0, "GPU": 0.5}
    # the smallest hosting type decides, so a worker fits on any of them
    two = [NodeShape("small", {"CPU": 4, "GPU": 1}, can_launch=True), NodeShape("big", {"CPU": 16, "GPU": 1}, alive=1)]
    plan = plan_workers(two, 2, use_gpu=True)
    assert plan.resources["CPU"] == 3.0 and all(_fits(plan.resources, s.resources) for s in two)


def test_custom_resources_pick_the_node_type():
    shapes = [NodeShape("a10", {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}, can_launch=True),
              NodeShape("t4", {"CPU": 4, "GPU": 1, "accelerator_type:T4": 1}, can_launch=True)]
    plan = plan_workers(shapes, 2, use_gpu=True, extra={"accelerator_type:A10G": 0.001})
    assert plan.resources == {"CPU": 6.0, "GPU": 1.0, "accelerator_type:A10G": 0.001} and plan.hosts == ["a10"]


def test_requests_no_node_can_ever_hold_fail_at_once_naming_request_and_shapes():
    cpu_only = [NodeShape("head", {"CPU": 8}, alive=1), NodeShape("cpu", {"CPU": 16}, can_launch=True)]
    with pytest.raises(PlacementError, match=r"GPU: 1.*head \{CPU: 8\} \(1 alive\); cpu \{CPU: 16\} \(launchable\)"):
        plan_workers(cpu_only, 2, use_gpu=True)
    gpu4 = [NodeShape("gpu", {"CPU": 4, "GPU": 1}, can_launch=True)]
    with pytest.raises(PlacementError, match=r"\{CPU: 8, GPU: 1\}"):
        plan_workers(gpu4, 1, use_gpu=True, cpus_per_worker=8)
    with pytest.raises(PlacementError, match="GPU: 2"):
        plan_workers(gpu4, 1, use_gpu=True, gpus_per_worker=2)
    # a type that cannot be launched (max_workers 0) and is not up cannot host either
    with pytest.raises(PlacementError):
        plan_workers([NodeShape("gpu", {"CPU": 4, "GPU": 1})], 1, use_gpu=True)
    # an explicit request that fits is kept as given
    assert plan_workers(gpu4, 1, use_gpu=True, cpus_per_worker=2).resources == {"CPU": 2.0, "GPU": 1.0}


def test_launchable_types_of_unknown_shape_do_not_fail():
    """A launcher type without `resources` (the cloud fills them in) may still host: size 1 CPU, no error."""
    cfg = {"head_node_type": "head", "max_workers": 4,
           "available_node_types": {"head": {"resources": {"CPU": 0}}, "gpu": {"max_workers": 4}}}
    shapes = launcher_node_types(cfg)
    assert [s.resources for s in shapes] == [{"CPU": 0.0}, None] and shapes[1].can_launch
    plan = plan_workers(shapes, 2, use_gpu=True)
    assert plan.resources == {"CPU": 1.0, "GPU": 1.0} and "unknown shape" in plan.note


def test_alive_nodes_are_grouped_by_shape():
    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.1",
              "Resources": {"CPU": 4.0, "GPU": 1.0, "node:10.0.0.1": 1.0, "memory": 1e10}},
             {"Alive": True, "NodeManagerAddress": "10.0.0.2",
              "Resources": {"CPU": 4.0, "GPU": 1.0, "node:10.0.0.2": 1.0, "memory": 1e10}},
             {"Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 64.0}},
             {"Alive": True, "NodeManagerAddress": "10.0.0.9", "Resources": {"CPU": 8.0, "node:__internal_head__": 1}}]
    shapes = alive_node_shapes(nodes)
    assert sorted((s.alive, tuple(sorted(s.resources.items()))) for s in shapes) == [
        (1, (("CPU", 8.0),)), (2, (("CPU", 4.0), ("GPU", 1.0)))]


# ------------------------------------------------------------------------------------ the real thing


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, fmnist_available):
    if not fmnist_available:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from ctray.data.sources import make_dataset

    root = tmp_path_factory.mktemp("placement")
    make_dataset("fashion-mnist", str(root), n_train=200, n_clean=50, n_test=50, shard_size=100, seed=0)
    return str(root)


@pytest.mark.timeout(300)
def test_worker_asking_for_an_accelerator_resource_is_placed_and_trains(ray_session, tiny_shards, tmp_path):
    """The session node declares 4 CPUs and one `ctray_test_accel` (a stand-in for a GPU node, no GPU
    needed): a 1-worker fit asking for that resource gets {CPU: 3, accel: 1}, is placed, and trains."""
    from ctray.engine.cluster import scaling
    from ctray.engine.train import train_model

    ov = [f"scale.worker_resources={{{TEST_ACCEL}: 1}}", "scale.num_workers=1", "base.epochs=1",
          "base.milestones=[1]", f"io.train=[{tiny_shards}/train-*.tar]"]
    cfg = load_config("smoke", parse_overrides(ov))
    sc, threads = scaling(cfg)
    assert sc.resources_per_worker == {"CPU": 3.0, TEST_ACCEL: 1.0} and threads == 3
    res = train_model(cfg, str(tmp_path / "m.pt"))
    assert os.path.exists(tmp_path / "m.pt") and res.n_train == 200


def test_a_request_no_node_has_fails_before_any_placement(ray_session, tiny_shards, tmp_path):
    from ctray.engine.train import train_model

    ov = ["scale.worker_resources={absent_accel: 1}", "scale.num_workers=1", f"io.train=[{tiny_shards}/train-*.tar]"]
    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"absent_accel: 1.*alive .*\{CPU: 4, ctray_test_accel: 1\}"):
        train_model(load_config("smoke", parse_overrides(ov)), str(tmp_path / "m.pt"))
    assert time.monotonic() - t < 60  # an error, not a placement group waiting forever
    cfg = load_config("smoke", parse_overrides(["scale.num_workers=1", "scale.use_gpu=true"]))
    from ctray.engine.cluster import scaling

    with pytest.raises(ConfigError, match="GPU: 1"):
        scaling(cfg)
