"""What every driver shares about the Ray cluster: starting or attaching to it, what its nodes look like,
and what each Ray Train worker asks for.

The per-worker request is sized from the nodes that can host a worker (alive nodes, plus the node types
an autoscaler may launch), never from the machine the driver runs on (the rule is
:func:`ctray.core.placement.plan_workers`). A request that no node type can ever satisfy fails at once
with a :class:`~ctray.errors.ConfigError` naming the request and the node shapes, instead of a placement
group that waits forever.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ctray.config import Config
from ctray.core.placement import NodeShape, PlacementError, local_cores, plan_workers
from ctray.errors import ConfigError

log = logging.getLogger(__name__)

# Where Ray's cluster launcher leaves the cluster config on the head node (the autoscaler reads it too).
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
_NOT_ASKED = ("memory", "object_store_memory")


def ray_logs_wanted() -> bool:
    """Whether Ray's own INFO logging is wanted: ``CTRAY_RAY_LOGS=1`` (``ctray -v`` sets it), or, in a
    Python session, the ``ctray`` logger enabled for DEBUG."""
    env = os.environ.get("CTRAY_RAY_LOGS")
    if env is not None:
        return env == "1"
    return logging.getLogger("ctray").isEnabledFor(logging.DEBUG)


def ensure_ray(cfg: Config | None = None) -> None:
    """Attach to a running cluster (``RAY_ADDRESS`` / ``ray start``) or start a local one; with ``cfg``,
    apply its Ray Data limits (:func:`apply_data_limits`)."""
    import ray

    from ctray.memory import use_system_arrow_pool, worker_pool_for_children

    use_system_arrow_pool()  # the driver streams every pass's rows: see ctray.memory
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        worker_pool_for_children()  # a local Ray's processes move the images: jemalloc (ctray.memory)
        ray.init(log_to_driver=True, logging_level=logging.WARNING)
    # Ray's helper processes (e.g. Train's placement-group cleaner) call a bare ray.init(): point them at
    # this cluster, or they fail when another local Ray runs on the same machine. RAY_ADDRESS=local (a
    # private local Ray although a `ray start` cluster runs here) would make them start new ones.
    if os.environ.get("RAY_ADDRESS", "") in ("", "local"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Ray's own INFO lines (Data's "Starting execution of Dataset ..." per pass, its operator chatter) only
    # when asked: ``ctray -v`` or CTRAY_RAY_LOGS=1. ctray's progress lines carry the run's story.
    verbose = ray_logs_wanted()
    ctx.print_on_execution_start = verbose
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if cfg is not None:
        apply_data_limits(cfg)


#: ``data.inflight_bytes=auto``: this share of the cluster's object store for Ray Data's blocks in flight.
INFLIGHT_SHARE = 0.25


def inflight_budget(cfg: Config) -> int:
    """Bytes of object store Ray Data may fill with blocks in flight (``data.inflight_bytes``; ``auto`` =
    :data:`INFLIGHT_SHARE` of the connected cluster's object store)."""
    import ray

    from ctray.core.budget import parse_bytes

    val = parse_bytes(cfg.data.inflight_bytes)
    if val is not None:
        return val
    return int(INFLIGHT_SHARE * float(ray.cluster_resources().get("object_store_memory", 0.0)))


def apply_data_limits(cfg: Config) -> int:
    """Cap Ray Data's object store use at :func:`inflight_budget` for every Dataset created after this call
    (a Dataset copies the driver's ``DataContext`` when it is created). Ray's default is half the store,
    which does not grow with N either, but it is not a budget the user sees, and with a cache of
    ``data.cache_bytes`` beside it the store can fill and spill. Returns the budget in bytes."""
    import ray.data

    budget = inflight_budget(cfg)
    opts = ray.data.DataContext.get_current().execution_options
    opts.resource_limits = opts.resource_limits.copy(object_store_memory=float(budget))
    log.info("Ray Data: at most %.0f MB of blocks in flight in the object store (data.inflight_bytes)", budget / 1e6)
    return budget


def train_data_config() -> Any:
    """Ray Train's ``DataConfig`` with the driver's Ray Data limits (:func:`apply_data_limits`): Train
    resolves its ingest options where it runs (a controller actor), which does not see the driver's
    ``DataContext``."""
    import ray.data
    import ray.train

    # built here rather than with DataConfig.default_ingest_options(), which passes the deprecated
    # exclude_resources and prints a RayDeprecationWarning on every fit
    opts = ray.data.DataContext.get_current().execution_options
    return ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(
        resource_limits=opts.resource_limits, preserve_order=opts.preserve_order,
        verbose_progress=opts.verbose_progress))


def alive_node_shapes(nodes: list[dict[str, Any]]) -> list[NodeShape]:
    """Group ``ray.nodes()`` rows that are alive by their resources (``node:<ip>`` keys dropped)."""
    groups: dict[tuple[tuple[str, float], ...], list[str]] = {}
    for n in nodes:
        if not n.get("Alive"):
            continue
        res = {k: float(v) for k, v in (n.get("Resources") or {}).items()
               if not k.startswith("node:") and k not in _NOT_ASKED}
        groups.setdefault(tuple(sorted(res.items())), []).append(str(n.get("NodeManagerAddress", "?")))
    return [NodeShape(f"alive {', '.join(ips[:3])}{' ...' if len(ips) > 3 else ''}", dict(key), alive=len(ips))
            for key, ips in groups.items()]


def launcher_node_types(config: dict[str, Any]) -> list[NodeShape]:
    """Node types of a Ray cluster launcher config (``available_node_types``), as launchable shapes.

    A type with ``max_workers: 0`` (or the head type) cannot be launched; a type without ``resources``
    has an unknown shape (the launcher fills it in from the instance type)."""
    head = config.get("head_node_type")
    out = []
    for name, t in (config.get("available_node_types") or {}).items():
        res = t.get("resources")
        launch = name != head and int(t.get("max_workers", config.get("max_workers", 0)) or 0) > 0
        out.append(NodeShape(str(name), {k: float(v) for k, v in res.items()} if res is not None else None,
                             can_launch=launch))
    return out


def declared_node_types() -> list[NodeShape]:
    """The node types an autoscaler may launch: the cluster config the autoscaler publishes in the GCS
    (KubeRay, autoscaler v2; the same source Ray Data's autoscaling reads), else the launcher's config
    file on this (head) node, else none (a fixed cluster: the alive nodes are all there is)."""
    try:
        import ray._private.state as state  # no public API yet; Ray Data's own autoscaler reads it so

        cc = state.state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - a missing or changed private API must not stop a run
        log.debug("no cluster config from the GCS: %s", e)
        cc = None
    if cc is not None and cc.node_group_configs:
        return [NodeShape(g.name, {k: float(v) for k, v in g.resources.items()}, can_launch=g.max_count != 0)
                for g in cc.node_group_configs]
    path = os.path.expanduser(LAUNCHER_CONFIG)
    if os.path.exists(path):
        import yaml

        try:
            with open(path) as f:
                return launcher_node_types(yaml.safe_load(f) or {})
        except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as e:
            log.warning("cannot read the launcher config %s (%s): sizing workers from the alive nodes only", path, e)
    return []


def node_shapes() -> list[NodeShape]:
    """Alive nodes plus the declared node types of the connected cluster."""
    import ray

    return alive_node_shapes(ray.nodes()) + declared_node_types()


def scaling(cfg: Config, shapes: list[NodeShape] | None = None) -> tuple[Any, int]:
    """Ray Train's ``ScalingConfig`` for ``cfg.scale`` and the torch threads per worker.

    Local mode (``scale.num_workers=0``) runs the loop in this process: its threads are this machine's
    cores. With workers, each asks for what :func:`~ctray.core.placement.plan_workers` sizes from the
    node shapes that can host it (``shapes``, default: the connected cluster's).

    Raises:
        ConfigError: no node type can ever host a worker with this request.
    """
    import ray.train

    s = cfg.scale
    if s.num_workers == 0:
        return ray.train.ScalingConfig(num_workers=0), s.torch_threads or local_cores()
    shapes = node_shapes() if shapes is None else shapes
    try:
        plan = plan_workers(shapes, s.num_workers, use_gpu=s.use_gpu, gpus_per_worker=s.gpus_per_worker,
                            cpus_per_worker=s.cpus_per_worker, extra=s.worker_resources)
    except PlacementError as e:
        raise ConfigError(str(e)) from None
    log.info("Ray Train: %d workers asking for %s each (%s); fits on %s", s.num_workers, plan.resources,
             plan.note, ", ".join(plan.hosts))
    threads = s.torch_threads or plan.threads
    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                   resources_per_worker=plan.resources), threads
