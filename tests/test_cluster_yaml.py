"""cluster.yaml against the schema Ray's own launcher validates it with (ray/autoscaler/ray-schema.json)."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_follows_rays_schema(schema):
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert sum(t["max_workers"] for t in workers) <= config["max_workers"]


def test_the_schema_catches_a_misspelt_field(schema):
    """The check is not vacuous: a field the launcher does not know is refused."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["gpu"]["max_worker"] = config["available_node_types"]["gpu"].pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(config, schema)
