"""Is there a Ray cluster at ``ray.address``? Checked before ``ray.init``, within seconds, with one line that
names the address and how to start or join a cluster.

``ray.init(address=...)`` on an address where no cluster listens retries its GCS connection for minutes (and
logs another address than the one given), and ends in a raw ``ConnectionError`` traceback. sip checks first:

- ``host:port`` and ``ray://host:port``: the host name resolves (within :data:`TIMEOUT_S`) and a TCP connection
  to the port opens (within :data:`TIMEOUT_S`);
- ``auto``: ``RAY_ADDRESS`` if set, else the cluster ``ray start`` recorded on this machine (Ray's
  ``ray_current_cluster`` file), else a GCS process running here; then that address as above;
- ``local`` and no address (a Ray started for the run) need no check; a set ``RAY_ADDRESS`` is checked, since
  Ray joins it instead.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket

__all__ = ["TIMEOUT_S", "RayAddressError", "check_address", "parse_address"]

TIMEOUT_S = 5.0  # per step (resolve, connect): a live head answers in milliseconds


class RayAddressError(ValueError):
    """No Ray cluster answers at the address a run was given (the message is one line and says what to do)."""


HOW = ("Start a cluster with `ray start --head` on the head machine (it prints the address to pass), or join a "
       "running one with its head's address (--address head:6379, or ray://head:10001 through Ray Client); or drop "
       "--address (ray.address) to start a local Ray for this run.")


def parse_address(address: str) -> tuple[str, int]:
    """``"head:6379"`` / ``"ray://head:10001"`` / ``"[::1]:6379"`` → (host, port).

    Raises:
        RayAddressError: not ``host:port`` with a port in 1..65535.
    """
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayAddressError(f"ray.address {address!r} is not an address: expected auto, local, host:port or "
                              f"ray://host:port (e.g. 127.0.0.1:6379). " + HOW)
    return host, int(port)


def _resolve(host: str, port: int, address: str) -> list[tuple]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return future.result(timeout=TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        raise RayAddressError(f"ray.address {address}: the host name {host} did not resolve within "
                              f"{TIMEOUT_S:.0f} s. " + HOW) from None
    except OSError as e:
        raise RayAddressError(f"ray.address {address}: the host name {host} does not resolve "
                              f"({e.strerror or e}). " + HOW) from None
    finally:
        pool.shutdown(wait=False)


def _reach(address: str, label: str | None = None) -> None:
    """Resolve and connect to ``address``; errors name it as ``label`` (how the user gave it)."""
    host, port = parse_address(address)
    address = label or address
    family, kind, proto, _, where = _resolve(host, port, address)[0]
    with socket.socket(family, kind, proto) as s:
        s.settimeout(TIMEOUT_S)
        try:
            s.connect(where)
        except socket.timeout:
            raise RayAddressError(f"ray.address {address}: no answer from {host} port {port} within "
                                  f"{TIMEOUT_S:.0f} s (no Ray cluster there, or a firewall drops it). "
                                  + HOW) from None
        except OSError as e:
            raise RayAddressError(f"ray.address {address}: nothing accepts connections at {host} port {port} "
                                  f"({e.strerror or e}): no Ray cluster runs there. " + HOW) from None


def _local_cluster(temp_dir: str | None) -> str | None:
    """The address of a cluster ``ray start`` left on this machine (Ray's own lookup), or None."""
    from ray._private import services, utils

    recorded = utils.read_ray_address(temp_dir)
    if recorded:
        return recorded
    running = services.find_gcs_addresses()
    return next(iter(running), None)


def check_address(address: str | None, env: dict[str, str] | None = None, temp_dir: str | None = None) -> None:
    """Fail fast, in one line, when no Ray cluster answers at ``address``.

    Args:
        address (str | None): ``ray.address`` (None / ``local``: a Ray started for the run).
        env (dict, optional): the environment (``RAY_ADDRESS``). Defaults to ``os.environ``.
        temp_dir (str, optional): Ray's temp folder where ``ray start`` records its cluster (Ray's default when
            None).

    Raises:
        RayAddressError: the address is malformed, does not resolve, or nothing answers at its port.
    """
    env = os.environ if env is None else env
    if env.get("RAY_ADDRESS"):  # Ray joins it whatever address it is given
        if env["RAY_ADDRESS"] not in ("auto", "local"):
            _reach(env["RAY_ADDRESS"], f"{env['RAY_ADDRESS']} (from RAY_ADDRESS, which Ray joins first)")
            return
        address = env["RAY_ADDRESS"]
    if address in (None, "", "local"):
        return
    if address == "auto":
        found = _local_cluster(temp_dir)
        if found is None:
            raise RayAddressError("ray.address auto: no Ray cluster runs on this machine (RAY_ADDRESS is unset and "
                                  "`ray start` recorded none). " + HOW)
        _reach(found, f"auto (the cluster recorded on this machine, {found})")
        return
    _reach(address)
