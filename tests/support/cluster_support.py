"""A throwaway Redis Cluster for tests: 3 primaries with a replica each (`redis-server
--cluster-enabled yes`, then `redis-cli --cluster create`), on loopback ports low enough that each
node's cluster bus port (+10000) is valid. Offers failover of a shard, resharding, and a restart of
every node that empties the cluster.

A subclass changes how the nodes listen and how they are reached (tls_support.TlsRedisClusterServers:
TLS only) through `_listen_args`, `cli_connection_args` (given to every redis-cli) and `client_kwargs`
(given to every redis-py client), and `.url`'s scheme through `scheme`."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import redis
from redis.cluster import ClusterNode, RedisCluster

from support.servers import ServerError, scratch_dir


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# Node ports and their bus ports (+10000) both below the kernel's ephemeral range (32768 and up on
# Linux by default): a node the fault tests kill must get its port back when restarted, and an
# outgoing connection's ephemeral port took a killed node's port in a soak ("Address already in use").
NODE_PORTS = range(20000, 22768)


def _free_node_ports(count: int) -> list[int]:
    """Ports in NODE_PORTS whose bus port (+10000) is free too."""
    ports: list[int] = []
    tries = 0
    while len(ports) < count:
        tries += 1
        if tries > 5000:
            raise ServerError("no free port pairs for a Redis Cluster")
        port = random.choice(NODE_PORTS)
        if port in ports or port + 10000 in ports or port - 10000 in ports:
            continue
        if _port_free(port) and _port_free(port + 10000):
            ports.append(port)
    return ports


class RedisClusterServers:
    """Six redis-server processes forming a cluster; `.url` names one node, as Azure hands out one."""

    scheme = "redis"

    def __init__(self, *, primaries: int = 3, extra_args: Optional[list[str]] = None) -> None:
        self.executable = shutil.which("redis-server")
        self.cli = shutil.which("redis-cli")
        if not self.executable or not self.cli:
            raise ServerError("redis-server / redis-cli not found; run `make servers`")
        self.root = Path(tempfile.mkdtemp(prefix="chr-cluster-", dir=scratch_dir()))
        self.ports = _free_node_ports(primaries * 2)
        self.primaries_wanted = primaries
        self.extra_args = list(extra_args or [])
        self.procs: dict[int, subprocess.Popen] = {}
        # How redis-cli and redis-py reach a node besides its address (a subclass sets TLS options).
        self.cli_connection_args: list[str] = []
        self.client_kwargs: dict = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            self._wait_answering(port)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        proc = subprocess.run(
            [*self._cli(), "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise ServerError(f"redis-cli --cluster create failed:\n{proc.stdout}\n{proc.stderr}")
        self.wait_healthy()

    def _start_node(self, port: int) -> None:
        node_dir = self.root / str(port)
        node_dir.mkdir(exist_ok=True)
        cmd = [
            self.executable,
            *self._listen_args(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(node_dir / "nodes.conf"),
            "--cluster-node-timeout", "2000",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(node_dir),
            "--logfile", str(node_dir / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.procs[port] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def _listen_args(self, port: int) -> list[str]:
        """redis-server's arguments saying where a node listens (its cluster bus is on port + 10000)."""
        return ["--port", str(port)]

    def _cli(self, port: Optional[int] = None) -> list[str]:
        """redis-cli with the connection options, and `-h 127.0.0.1 -p port` when given."""
        address = ["-h", "127.0.0.1", "-p", str(port)] if port is not None else []
        return [self.cli, *self.cli_connection_args, *address]

    def _wait_answering(self, port: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, **self.client_kwargs)
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
            finally:
                client.close()
        raise ServerError(f"cluster node on port {port} did not start")

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until every node says cluster_state:ok and there are `primaries` primaries, each with a
        replica attached."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                states = [self.node(p).cluster("info")["cluster_state"] for p in self.ports if self.is_running(p)]
                nodes = self.nodes()
                primaries = [n for n in nodes if n["role"] == "master" and n["slots"] > 0 and not n["failed"]]
                replicated = all(
                    any(r["role"] == "slave" and r["master_id"] == p["id"] and not r["failed"] for r in nodes)
                    for p in primaries
                )
                if all(s == "ok" for s in states) and len(primaries) == self.primaries_wanted and replicated:
                    return
                last = f"states {states}, primaries {primaries}"
            except redis.RedisError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise ServerError(f"the cluster did not become healthy: {last}")

    def remove(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- inspection --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.ports[0]}/0"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5, **self.client_kwargs)

    def is_running(self, port: int) -> bool:
        proc = self.procs.get(port)
        return proc is not None and proc.poll() is None

    def client(self) -> RedisCluster:
        return RedisCluster(
            startup_nodes=[ClusterNode("127.0.0.1", p) for p in self.ports if self.is_running(p)],
            decode_responses=True,
            **self.client_kwargs,
        )

    def nodes(self) -> list[dict]:
        """CLUSTER NODES as dicts: id, port, role ('master'/'slave'), master_id, slots (count)."""
        for port in self.ports:
            if not self.is_running(port):
                continue
            text = subprocess.run(
                [*self._cli(port), "cluster", "nodes"], capture_output=True, text=True, timeout=10, check=True
            ).stdout
            out = []
            for line in text.strip().splitlines():
                parts = line.split()
                addr = parts[1].split("@")[0]
                slots = 0
                for rng in parts[8:]:
                    if rng.startswith("["):
                        continue
                    lo, _, hi = rng.partition("-")
                    slots += int(hi or lo) - int(lo) + 1
                out.append(
                    {
                        "id": parts[0],
                        "port": int(addr.rsplit(":", 1)[1]),
                        "role": "master" if "master" in parts[2] else "slave",
                        "failed": "fail" in parts[2],
                        "master_id": parts[3],
                        "slots": slots,
                    }
                )
            return out
        raise ServerError("no cluster node is running")

    def primaries(self) -> list[dict]:
        return [n for n in self.nodes() if n["role"] == "master" and n["slots"] > 0 and not n["failed"]]

    def keys_per_primary(self) -> dict[int, int]:
        return {n["port"]: self.node(n["port"]).dbsize() for n in self.primaries()}

    def flushall(self) -> None:
        for n in self.primaries():
            self.node(n["port"]).flushall()

    # -- faults ------------------------------------------------------------------------------------

    def restart_empty(self) -> None:
        """Every node SIGKILLed and started again on its port with its nodes.conf: the cluster comes back with its
        slot map and roles and without its data (no persistence), as a region's Redis that restarts empty."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            self._wait_answering(port)
        self.wait_healthy()

    def failover(self, primary: dict, timeout: float = 30) -> None:
        """A manual failover of one shard: its replica takes over (CLUSTER FAILOVER on the replica)."""
        replicas = [n for n in self.nodes() if n["role"] == "slave" and n["master_id"] == primary["id"]]
        if not replicas:
            raise ServerError(f"primary {primary['port']} has no replica")
        replica = replicas[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # A manual failover waits for the replica to catch up; under load it may time out, so
            # it is asked again until the two nodes say they swapped roles.
            self.node(replica["port"]).execute_command("CLUSTER FAILOVER")
            asked = time.monotonic()
            while time.monotonic() < min(deadline, asked + 8):
                if self._role(replica["port"]) == "master" and self._role(primary["port"]) == "slave":
                    self.wait_healthy()
                    return
                time.sleep(0.1)
        raise ServerError(f"the failover of {primary['port']} to {replica['port']} did not complete")

    def wait_agreed(self, timeout: float = 60) -> None:
        """Until `redis-cli --cluster check` finds every node agreeing on the slot map (a change
        takes a moment to propagate)."""
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(
                [*self._cli(), "--cluster", "check", f"127.0.0.1:{self.primaries()[0]['port']}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            out = proc.stdout
            if proc.returncode == 0 and "[ERR]" not in out:
                return
            time.sleep(0.2)
        raise ServerError(f"the cluster's nodes do not agree on the slot map:\n{out[-2000:]}")

    def _role(self, port: int) -> str:
        role = self.node(port).execute_command("ROLE")
        return role[0].decode() if isinstance(role[0], bytes) else role[0]

    def reshard(self, source: dict, target: dict, slots: int, timeout: float = 300) -> subprocess.CompletedProcess:
        """Moves `slots` slots (and their keys) from one primary to another (`redis-cli --cluster reshard`)."""
        self.wait_agreed()
        proc = subprocess.run(
            [
                *self._cli(),
                "--cluster",
                "reshard",
                f"127.0.0.1:{source['port']}",
                "--cluster-from",
                source["id"],
                "--cluster-to",
                target["id"],
                "--cluster-slots",
                str(slots),
                "--cluster-yes",
                "--cluster-pipeline",
                "100",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise ServerError(f"redis-cli --cluster reshard failed:\n{proc.stdout[-2000:]}\n{proc.stderr}")
        return proc


# --------------------------------------------------------------------------------------------------
# A cluster whose clients reach every node through a proxy
# --------------------------------------------------------------------------------------------------


def _replication(client: redis.Redis) -> dict:
    return client.info("replication")


class ProxiedRedisClusterServers(RedisClusterServers):
    """A cluster whose nodes announce the port of a TCP proxy in front of each (`cluster-announce-port`;
    the bus keeps its own port), so CLUSTER SLOTS and MOVED send every client through the proxies, and any
    node can be cut, stalled or held as its clients see it. `.proxies[port]` is the proxy of the node on
    `port`; `.url` names node 0's proxy (the product's one URL), `.direct_url` node 0 itself. The helpers
    above (nodes(), failover(), wait_healthy()...) speak of the nodes' own ports, as before.

        crash_primary(primary, down_for)
                    SIGKILL a primary once its replica has every write it acknowledged, wait for the replica
                    to take over, restart the node (it rejoins as a replica) and let clients reach it again
    """

    def __init__(self, proxy_factory=None, **kwargs) -> None:
        super().__init__(**kwargs)
        if proxy_factory is None:
            from support.tcp_proxy import TcpProxy

            proxy_factory = TcpProxy
        self.proxies = {port: proxy_factory(port) for port in self.ports}
        self._node_port = {proxy.port: port for port, proxy in self.proxies.items()}

    def _listen_args(self, port: int) -> list[str]:
        return [
            *super()._listen_args(port),
            "--cluster-announce-ip", "127.0.0.1",
            "--cluster-announce-port", str(self.proxies[port].port),
            "--cluster-announce-bus-port", str(port + 10000),
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.proxies[self.ports[0]].port}/0"

    @property
    def direct_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.ports[0]}/0"

    def nodes(self) -> list[dict]:
        nodes = super().nodes()
        for node in nodes:
            node["port"] = self._node_port.get(node["port"], node["port"])
        return nodes

    def remove(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        super().remove()

    # -- faults ------------------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        proc = self.procs.get(port)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    def restart(self, port: int) -> None:
        """Starts a node that was killed, on its port and with its nodes.conf (its data is gone: no persistence)."""
        self._start_node(port)
        try:
            self._wait_answering(port)
        except ServerError as exc:
            log = self.root / str(port) / "redis.log"
            tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            raise ServerError(f"{exc}; its log ends:\n" + "\n".join(tail)) from None

    def crash_primary(self, primary: dict, down_for: float = 0.0, timeout: float = 30) -> str:
        """A primary dies, once its replica has every write it acknowledged (client writes paused meanwhile,
        `CLIENT PAUSE WRITE`): SIGKILL, its replica takes over (cluster-node-timeout), and the node, restarted
        empty, rejoins as a replica before clients may reach it again (its proxy refuses them meanwhile).
        Waiting for the replica keeps out the loss docs/design.md documents (section 16, limits: replication is
        asynchronous, so a failover to a replica behind its primary loses the writes it had not received).
        Replication runs through the proxies too (a node reaches its primary at the announced port), so the
        proxy is partitioned only once the replica has caught up. Returns what happened; a replica that does
        not catch up within `timeout` gets a graceful failover instead."""
        port = primary["port"]
        replicas = [n for n in self.nodes() if n["role"] == "slave" and n["master_id"] == primary["id"]]
        if not replicas:
            raise ServerError(f"primary {port} has no replica")
        replica = replicas[0]["port"]
        proxy = self.proxies[port]
        self.node(port).execute_command("CLIENT", "PAUSE", str(int(timeout * 1000)), "WRITE")
        try:
            caught_up = self._wait_caught_up(port, replica, timeout)
        except BaseException:
            self.node(port).execute_command("CLIENT", "UNPAUSE")
            raise
        if caught_up is not None:
            self.node(port).execute_command("CLIENT", "UNPAUSE")
            self.failover(primary)
            return f"replica {replica} stayed behind ({caught_up}): failed over instead"
        proxy.partition()
        try:
            self.kill(port)
            killed = time.monotonic()
            while self._role(replica) != "master":
                if time.monotonic() > killed + timeout:
                    raise ServerError(f"replica {replica} did not take over from the killed primary {port}")
                time.sleep(0.1)
            took_over = time.monotonic() - killed
            time.sleep(down_for)
            self.restart(port)
            while True:
                state = _replication(self.node(port))
                if state.get("role") == "slave" and state.get("master_link_status") == "up":
                    break
                if time.monotonic() > killed + 2 * timeout:
                    raise ServerError(f"the restarted node {port} did not rejoin as a replica")
                time.sleep(0.1)
            return f"killed {port}, replica {replica} took over in {took_over:.1f}s"
        finally:
            proxy.heal()

    def _wait_caught_up(self, primary: int, replica: int, timeout: float) -> Optional[str]:
        """None once `replica` has every write `primary` made, else how far behind it stayed."""
        deadline = time.monotonic() + timeout
        while True:
            offset = _replication(self.node(primary))["master_repl_offset"]
            copied = _replication(self.node(replica)).get("slave_repl_offset", -1)
            if copied >= offset:
                return None
            if time.monotonic() > deadline:
                return f"{copied} < {offset}"
            time.sleep(0.01)
