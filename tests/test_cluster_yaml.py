"""Offline checks of the Ray cluster launcher configs (cluster.yaml, cluster-onprem.yaml).

``validate_config(prepare_config(cfg))`` is what ``ray up`` runs before it
contacts anything: ``prepare_config`` merges the provider's defaults.yaml that
ships inside the ray package (shallow, key by key) and fills per-node-type
min/max workers; ``validate_config`` checks the result against Ray's JSON
schema (unknown top-level and node-type keys, value types) and a few cross-field
rules (head_node_type exists, sum of min_workers <= max_workers).

It does not look inside ``provider`` (extra keys allowed) or ``node_config``
(any object): a misspelled InstanceType or ImageId only fails at ``ray up``.
Nor does it run the shell commands. The medsweep-specific tests below cover
what medsweep relies on in them. No cluster is started and nothing is contacted.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.providers import _get_default_config
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
AWS = ROOT / "cluster.yaml"
ONPREM = ROOT / "cluster-onprem.yaml"
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
EDITABLE_INSTALL = re.compile(r"pip install -e (\S+)")


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def check(cfg: dict) -> dict:
    """What `ray up` does to a config before launching anything; returns the prepared one."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def commands(cfg: dict, key: str) -> str:
    return "\n".join(cfg.get(key) or [])


@pytest.fixture(scope="module", params=[AWS, ONPREM], ids=["aws", "onprem"])
def cfg(request) -> dict:
    return load(request.param)


@pytest.fixture(scope="module")
def aws() -> dict:
    return load(AWS)


@pytest.fixture(scope="module")
def onprem() -> dict:
    return load(ONPREM)


# --- Ray's own validation -------------------------------------------------------


def test_validates(cfg):
    check(cfg)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.update(max_worker=4), id="misspelled-top-level-key"),
        pytest.param(lambda c: c.update(idle_timeout_minutes="ten"), id="number-as-string"),
        pytest.param(lambda c: c.update(head_start_ray_commands="ray start --head"), id="string-not-list"),
        pytest.param(lambda c: c["auth"].update(ssh_usr="ubuntu"), id="misspelled-auth-key"),
    ],
)
def test_typos_are_caught(cfg, mutate):
    broken = copy.deepcopy(cfg)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        check(broken)


def test_node_type_typos_are_caught(aws):
    broken = copy.deepcopy(aws)
    broken["available_node_types"]["gpu.1x.a10g"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        check(broken)

    fractional = copy.deepcopy(aws)
    fractional["available_node_types"]["gpu.1x.a10g"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        check(fractional)


def test_min_workers_above_global_max_is_caught(aws):
    broken = copy.deepcopy(aws)
    broken["available_node_types"]["gpu.1x.a10g"]["min_workers"] = aws["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        check(broken)


# --- What medsweep relies on --------------------------------------------------------


def test_nothing_left_to_ray_defaults(cfg):
    # prepare_config fills every missing top-level key from Ray's defaults.yaml;
    # the AWS one installs a Ray nightly wheel in setup_commands.
    defaults = _get_default_config(cfg["provider"])
    missing = set(defaults) - set(cfg)
    assert not missing, f"left to Ray's defaults: {sorted(missing)}"


def test_setup_installs_medsweep_from_the_synced_code(cfg):
    setup = commands(cfg, "setup_commands")
    paths = EDITABLE_INSTALL.findall(setup)
    assert paths, "setup_commands must pip install -e the medsweep checkout"
    for path in paths:
        assert cfg["file_mounts"].get(path) == ".", f"{path} is not where file_mounts puts the repository"
    assert re.search(r"pip install \"torch[^\"]*\"", setup), "setup_commands must install torch"


def test_cluster_ray_matches_the_launcher(cfg):
    # `ray up` and the cluster's autoscaler share the config format: same Ray everywhere.
    pins = re.findall(r"ray\[[^\]]*\]==([\w.]+)", commands(cfg, "setup_commands"))
    assert pins == [ray.__version__]


def test_both_files_install_the_same_way(aws, onprem):
    def install_lines(cfg):
        lines = [c for c in cfg["setup_commands"] if "pip install" in c]
        return [EDITABLE_INSTALL.sub("pip install -e CODE", c) for c in lines]

    assert install_lines(aws) == install_lines(onprem)


def test_shared_store_is_mounted_on_every_node(cfg):
    # initialization_commands run on head and workers alike.
    init = commands(cfg, "initialization_commands")
    assert re.search(r"\bmount /mnt/shared\b", init)
    for sub in ("data", "preload", "sweeps"):
        assert f"/mnt/shared/{sub}" in init


def test_head_starts_ray_with_reachable_dashboard(cfg):
    head = commands(cfg, "head_start_ray_commands")
    assert "ray start --head" in head
    assert re.search(r"--dashboard-host[= ]0\.0\.0\.0", head)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "$RAY_HEAD_IP:6379" in commands(cfg, "worker_start_ray_commands")


def test_aws_head_takes_no_tasks_and_every_worker_has_a_gpu(aws):
    prepared = check(aws)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        assert node_type["resources"].get("GPU", 0) >= 1, f"{name} has no GPU"
        assert node_type["min_workers"] == 0, f"{name} keeps GPUs running while idle"


def test_aws_head_can_run_the_autoscaler(aws):
    # The AWS autoscaler on the head needs boto3, which Ray does not install.
    assert "boto3" in commands(aws, "head_setup_commands")


def test_onprem_head_takes_no_tasks(onprem):
    # The local provider ignores node-type resources, so only ray start can do it.
    head = commands(onprem, "head_start_ray_commands")
    assert "--num-cpus=0" in head and "--num-gpus=0" in head


def test_onprem_addresses_are_documentation_placeholders(onprem):
    documentation = ipaddress.ip_network("192.0.2.0/24")  # RFC 5737 TEST-NET-1
    provider = onprem["provider"]
    ips = [provider["head_ip"], *provider["worker_ips"]]
    assert all(ipaddress.ip_address(ip) in documentation for ip in ips)
    prepared = check(onprem)
    assert prepared["max_workers"] == len(provider["worker_ips"])
