"""The serving config (cluster/replica_config.py, ingress/serving_config.py): one typed model whose defaults
nothing else repeats; build_app arguments (strings from `serve run`), `grok1 serve` flags and the manifests
(tests/test_deploy.py) only override it, and a bad value is refused with the field's name.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from cli.main import build_parser, main
from cluster.replica_config import ReplicaConfig, ServingConfigError
from cluster.router import Router, start_router
from grok1.config import load_config
from ingress.serving_config import ServingConfig
from workers.group import GroupSpec


def test_build_app_strings_are_converted():
    """`serve run ingress.app:build_app ep=1 ...` passes every value as a string."""
    options = ServingConfig.from_overrides({"config": "c.yaml", "ep": "1", "random_if_missing": "true",
                                            "tokenizer": "None", "max_queue": 8, "capacity_factor": "1.5",
                                            "checkpoint": "none"})
    assert (options.ep, options.random_if_missing, options.tokenizer, options.max_queue) == (1, True, None, 8)
    assert (options.capacity_factor, options.checkpoint) == (1.5, None)
    assert ServingConfig.from_overrides({}) == ServingConfig()


@pytest.mark.parametrize("args, words", [
    ({"epp": 2}, "epp: unknown setting (did you mean ep?)"),
    ({"placement_strategy": "RANDOM"}, "placement_strategy: Input should be 'PACK'"),
    ({"ep": "0"}, "ep: Input should be greater than or equal to 1"),
    ({"ep": "two"}, "ep: Input should be a valid integer"),
    ({"random_if_missing": "maybe"}, "random_if_missing: Input should be a valid boolean"),  # was silently False
    ({"body_timeout_s": "-1"}, "body_timeout_s: Input should be greater than 0"),
    ({"max_queue": -1}, "max_queue: Input should be greater than or equal to 0"),
    ({"step_timeout_s": "nan"}, "step_timeout_s"),
    ({"backend": "thread"}, "backend: Input should be 'ray' or 'local'"),
    ({"stream_interval": "0"}, "stream_interval: Input should be greater than or equal to 1"),
    ({"stream_interval": 1025}, "stream_interval: Input should be less than or equal to 1024"),
])
def test_a_bad_build_app_argument_is_refused_by_name(args, words):
    from ingress.app import build_app

    with pytest.raises(ServingConfigError) as info:
        build_app(args)  # refused before any config is read or Ray is asked for anything
    assert words in str(info.value)


def test_build_app_checks_the_mesh_against_the_model():
    from grok1.config import ConfigError
    from ingress.app import build_app

    with pytest.raises(ConfigError, match="ep=3 does not divide"):
        build_app({"config": "configs/grok-1-tiny.yaml", "checkpoint": "/nonexistent", "ep": 3})


def test_serve_flags_override_and_bad_values_name_the_field(capsys):
    parser = build_parser()
    args = parser.parse_args(["serve", "--ep", "1", "--replicas", "3", "--no-pipelined", "--auth-health"])
    from cli import flags

    given = flags.overrides(args, ServingConfig)
    assert given == {"ep": 1, "num_replicas": 3, "pipelined": False, "auth_health": True}
    assert ServingConfig.from_overrides(given).tp == ServingConfig().tp  # what was not given keeps its default
    assert main(["serve", "--ep", "0"]) == 2
    assert "ep: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(["serve", "--body-timeout-s", "0"]) == 2
    assert "body_timeout_s: Input should be greater than 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--placement-strategy", "RANDOM"])
    assert "invalid choice: 'RANDOM'" in capsys.readouterr().err


def test_serve_help_is_the_fields_descriptions():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    for name, field in ServingConfig.model_fields.items():
        assert field.description, f"{name} has no description"
        assert " ".join(field.description.split()) in help_text, f"--help does not show {name}'s description"


def test_defaults_are_declared_once():
    """GroupSpec, the router and the scheduler take their settings from the config and declare none."""
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(GroupSpec))
    for function in (Router.__init__, start_router):
        repeated = set(inspect.signature(function).parameters) & set(ReplicaConfig.model_fields)
        assert not repeated, f"{function.__qualname__} declares {repeated} again"
    from cluster.scheduler import Scheduler

    assert inspect.signature(Scheduler).parameters["max_queue"].default is None


def test_group_spec_and_router_settings_come_from_the_config():
    config = load_config("configs/grok-1-tiny.yaml")
    replica = ServingConfig(ep=2, placement_strategy="SPREAD", step_timeout_s=7, api_key_file="k").replica()
    assert type(replica) is ReplicaConfig and replica.step_timeout_s == 7  # the router never sees ingress fields
    spec = replica.group_spec(config, "ckpt", {"B": "2", "A": "1"})
    assert (spec.mesh.ep, spec.strategy, spec.step_timeout_s, spec.env) == (2, "SPREAD", 7, (("A", "1"), ("B", "2")))
    assert replica.override(ep=1).ep == 1
    with pytest.raises(ServingConfigError, match="tp: Input should be greater than or equal to 1"):
        replica.override(tp=0)
