"""A bad or unreachable ``--address`` with ``--engine ray`` fails within seconds in one line naming the address and
how to start or join a cluster (no minutes of GCS retries, no traceback); ``ray.num_cpus`` / ``ray.num_gpus``
refuse NaN and infinity by key. Only loopback ports that are closed and ``.invalid`` names are used: no traffic
leaves this machine."""

import json
import math
import socket
import time

import pytest
from typer.testing import CliRunner

from sip.augment.run import SynthRecipe
from sip.cli import app
from sip.config import ConfigError, load_config
from sip.scale.ray_address import RayAddressError, check_address, parse_address
from sip.scale.ray_config import RayConfig


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_local_cluster(tmp_path, monkeypatch):
    """A machine where `ray start` recorded no cluster and no GCS process runs."""
    pytest.importorskip("ray")
    from ray._private import services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    return tmp_path / "ray-tmp"


def synth_cli(tmp_path, address: str):
    start = time.monotonic()
    result = CliRunner().invoke(app, ["synth", "-o", str(tmp_path / "out"), "--per-class", "1", "--steps", "2",
                                      "--engine", "ray", "--address", address, "--set", 'classes=["cat"]'])
    return result, time.monotonic() - start


@pytest.mark.enable_socket
@pytest.mark.parametrize("kind", ["closed-port", "unresolvable", "ray-client-closed", "auto-no-cluster",
                                  "auto-stale-record"])
def test_an_address_without_a_cluster_fails_fast_in_one_line(kind, tmp_path, no_local_cluster):
    port = closed_port()
    address = {"closed-port": f"127.0.0.1:{port}", "unresolvable": "nosuchhost.invalid:6379",
               "ray-client-closed": f"ray://127.0.0.1:{port}"}.get(kind, "auto")
    if kind == "auto-stale-record":  # a cluster `ray start` recorded, since stopped without cleaning up
        (no_local_cluster / "ray").mkdir(parents=True)
        (no_local_cluster / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    result, seconds = synth_cli(tmp_path, address)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"error: ray.address {address}") and "`ray start --head`" in lines[0]
    assert "drop --address" in lines[0]
    if kind == "auto-stale-record":
        assert f"127.0.0.1:{port}" in lines[0]
    assert seconds < 30
    assert not (tmp_path / "out").exists()  # nothing written, no lock left behind


def test_auto_with_no_cluster_says_none_runs_here(no_local_cluster):
    with pytest.raises(RayAddressError, match=r"ray.address auto: no Ray cluster runs on this machine"):
        check_address("auto")


@pytest.mark.enable_socket
def test_ray_address_in_the_environment_is_checked_because_ray_joins_it(monkeypatch):
    pytest.importorskip("ray")
    port = closed_port()
    with pytest.raises(RayAddressError, match=rf"127.0.0.1:{port} \(from RAY_ADDRESS"):
        check_address(None, env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    check_address(None, env={})  # no address, no RAY_ADDRESS: a local Ray for the run, nothing to check


@pytest.mark.parametrize("address", ["head", "head:port", "head:0", "head:70000", ":6379", "ray://"])
def test_a_malformed_address_is_refused_when_the_recipe_loads(address):
    with pytest.raises(ConfigError, match="is not an address: expected auto, local, host:port"):
        load_config(SynthRecipe, None, [f"ray.address={json.dumps(address)}"])
    assert parse_address("ray://[::1]:10001") == ("::1", 10001)


@pytest.mark.parametrize("key, value", [("num_gpus", math.inf), ("num_cpus", math.nan), ("num_cpus", math.inf),
                                        ("num_gpus", math.nan)])
def test_non_finite_ray_resources_are_refused_by_key(key, value):
    with pytest.raises(ValueError, match=rf"ray\.{key} must be a finite number"):
        RayConfig(**{key: value})
    with pytest.raises(ConfigError, match=rf"ray\.{key}"):
        load_config(SynthRecipe, None, [f"ray.{key}={'.nan' if math.isnan(value) else '.inf'}"])
