"""Helpers for the training tests: a tiny imagefolder dataset, running the scripts as real processes
(``accelerate launch`` for two processes on CPU/gloo), and reading their outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ROOT / "training"
CONFIGS = TRAINING / "configs"
if str(TRAINING) not in sys.path:
    sys.path.insert(0, str(TRAINING))

# One thread per process: float reductions then have a fixed order, which bitwise resume needs,
# and two processes do not oversubscribe the CPU.
BASE_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TQDM_DISABLE": "1",
}


def make_imagefolder(root: Path, per_class: int = 8, val_per_class: int = 3, corrupt: bool = True, seed: int = 0):
    """train/ and validation/ with classes cat, dog, fox of random-size RGB PNGs (+ one corrupt file)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("validation", val_per_class)):
        for c in ("cat", "dog", "fox"):
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(16, 40, size=2))
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{c}_{i}.png")
    if corrupt:
        (root / "train" / "dog" / "dog_99.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def run_script(script: str, args: list, processes: int = 1, env: dict | None = None, timeout: int = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``training/SCRIPT`` as its own process; two processes through ``accelerate launch`` on CPU."""
    path = str(TRAINING / script)
    full_env = {**os.environ, **BASE_ENV, **(env or {})}
    if processes == 1:
        cmd = [sys.executable, path, *map(str, args)]
    else:
        # `accelerate launch --cpu` starts a single process unless MPI is installed; torchrun via
        # --multi_gpu with ACCELERATE_USE_CPU=1 gives N CPU processes on the gloo backend.
        full_env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", "--num_cpu_threads_per_process", "1", path, *map(str, args)]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(output_dir: Path) -> list[dict]:
    with open(Path(output_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_rows(output_dir: Path, keys=("loss", "mse", "vb", "grad_norm", "lr")) -> list[tuple]:
    return [tuple([m["step"]] + [m.get(k) for k in keys]) for m in read_metrics(output_dir) if "loss" in m]


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return load_file(str(files[0]))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("tiny_data"))
