"""Device names, availability, autocast dtype per device, and the --device option's one-line errors.

This machine has no GPU; the CUDA branches are checked with torch's availability queries
replaced (monkeypatch), which is all the resolution code reads.
"""

from __future__ import annotations

import pytest
import torch

from rsitr.devices import (
    best_device,
    distributed_backend,
    module_device,
    needs_grad_scaling,
    parse_device,
    reduced_dtype,
    resolve_device,
    to_device,
)
from rsitr.distributed import env_world, local_device
from rsitr.errors import ConfigError
from rsitr.precision import autocast
from rsitr_cli.main import main


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` CUDA devices (bf16-capable unless told otherwise)."""

    def fake(n: int, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    return fake


def test_names_parse_case_and_space_insensitively():
    assert parse_device(None) is None and parse_device("auto") is None and parse_device(" ") is None
    assert parse_device(" CPU ") == torch.device("cpu")
    assert parse_device("cuda") == torch.device("cuda", 0)
    assert parse_device("Cuda:3") == torch.device("cuda", 3)
    assert parse_device("mps") == torch.device("mps")
    for bad in ("gpu", "cuda:", "cuda:-1", "cuda:x", "tpu"):
        with pytest.raises(ConfigError, match=f"device '{bad}' is not a device name"):
            parse_device(bad)


def test_a_device_the_machine_lacks_is_a_one_line_error_naming_it(gpus):
    gpus(0)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda:1")
    assert "'cuda:1'" in str(err.value) and "no CUDA device" in str(err.value) and "\n" not in str(err.value)
    gpus(2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"'cuda:2' is not available: this machine has 2 CUDA device\(s\): cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_auto_is_the_best_available(gpus, monkeypatch):
    gpus(0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert best_device() == resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'mps' is not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert best_device() == torch.device("mps")
    gpus(3)
    assert best_device() == torch.device("cuda", 0)


def test_the_reduced_dtype_follows_the_device(gpus):
    assert reduced_dtype("cpu") == torch.bfloat16
    assert reduced_dtype("mps") == torch.float16
    gpus(1, bf16=True)
    assert reduced_dtype("cuda:0") == torch.bfloat16 and not needs_grad_scaling("cuda:0", "bf16")
    gpus(1, bf16=False)  # a pre-Ampere GPU: float16, which needs loss scaling in training
    assert reduced_dtype("cuda:0") == torch.float16 and needs_grad_scaling("cuda:0", "bf16")
    assert not needs_grad_scaling("cuda:0", "fp32") and not needs_grad_scaling("cpu", "bf16")
    assert distributed_backend("cuda:1") == "nccl" and distributed_backend("cpu") == "gloo"


def test_autocast_runs_on_the_device_of_the_tensors():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("bf16"):  # the CPU by default, as before devices existed
        assert (a @ b).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16"):
        autocast("fp16", "cpu")


def test_autocast_on_a_gpu_uses_its_half_type(gpus):
    gpus(1, bf16=False)
    context = autocast("bf16", "cuda:0")  # made, not entered: there is no real GPU to run it on
    assert context.device == "cuda" and context.fast_dtype == torch.float16
    gpus(1, bf16=True)
    assert autocast("bf16", "cuda:0").fast_dtype == torch.bfloat16


def test_each_process_of_a_gpu_node_gets_its_own_gpu(gpus):
    gpus(4)
    assert local_device("cuda", 2) == torch.device("cuda", 2)
    assert local_device(None, 3) == torch.device("cuda", 3)
    assert local_device("cuda:0", 3) == torch.device("cuda", 0)  # pinned by hand: kept
    assert local_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="'cuda:5' is not available"):
        local_device(None, 5)


def test_the_torchrun_environment_is_read_and_checked(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert env_world().size == 1 and env_world().main and not env_world().distributed
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = env_world()
    assert (world.rank, world.size, world.local_rank, world.main, world.distributed) == (1, 2, 1, False, True)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2 and WORLD_SIZE=2"):
        env_world()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        env_world()


def test_module_device_and_to_device():
    layer = torch.nn.Linear(2, 2)
    assert module_device(layer) == torch.device("cpu") and module_device(torch.nn.ReLU()) == torch.device("cpu")
    batch = {"x": torch.ones(2), "m": torch.ones(2, dtype=torch.bool)}
    moved = to_device(batch, "cpu")
    assert moved.keys() == batch.keys() and moved["m"].dtype == torch.bool


@pytest.mark.parametrize("command", [
    ["train", "--dataset", "nowhere.json", "--out", "run"],
    ["features", "nowhere.json"],
    ["evaluate", "run"],
    ["pretrain", "nowhere", "--out", "pre"],
    ["benchmark", "--models", "vsepp", "--dataset", "nowhere.json", "--out", "bench"],
    ["ablate", "dove-ifa", "--dataset", "nowhere.json", "--out", "abl"],
    ["index", "build", "nowhere", "--model", "model", "--out", "index"],
    ["index", "add", "index", "nowhere"],
    ["search", "index", "a road"],
    ["serve", "index"],
    ["localize", "model", "scene.tif", "a road"],
    ["localize-eval", "model", "anno.json", "images"],
    ["analyze", "model"],
])
def test_cli_device_that_is_not_there_is_one_line_naming_it(command, gpus, tmp_path, monkeypatch, capsys):
    gpus(0)
    monkeypatch.chdir(tmp_path)
    code = main(["--quiet", *command, "--device", "cuda:3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "'cuda:3'" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "pre").exists()
