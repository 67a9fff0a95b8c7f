"""What both trainers share: run folders, RNG capture, CSV logs, resumable checkpoints,
the step-indexed data loader, sharded validation, and the training loop skeleton.

A run folder holds ``config.yaml`` (resolved), ``command.txt``, ``git_revision.txt``,
``train_log.csv``, ``val_log.csv``, ``checkpoints/last.pt`` (resumable, written
atomically), ``checkpoints/step_<N>.pt`` snapshots (every ``train.keep_every`` steps, as
the authors kept theirs), ``checkpoints/best.pt`` (best validation PSNR, only when the
validation pairs are not a test split), ``samples/``, ``resumes.txt`` (one line per
resume) and ``.lock`` (one run per folder: :func:`claim_run_dir`).
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomicfile import write_text_atomic
from ..checkpoints import PROJECT_FORMAT, CheckpointError, read_checkpoint, save_atomic
from ..config import ConfigError, dump_config
from ..data import ImagePair, PairedImageDataset, StepBatchSampler, collate, split_pairs
from ..inference import pad_to, padded_size
from ..messages import first_few
from ..metrics import psnr_ssim
from ..runfolder import RunFolder, RunFolderError
from .stopping import ignore_stop_signals

ROOT = Path(__file__).resolve().parents[2]


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "") if rev.returncode == 0 \
            else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(argv: Optional[List[str]] = None) -> str:
    """The command that started this process, as a shell would take it back: the interpreter,
    then ``argv`` (the program and its arguments; default ``sys.argv``), each word quoted
    where needed."""
    return shlex.join([sys.executable, *(sys.argv if argv is None else argv)])


def prepare_run_dir(run_dir: Path, cfg: Dict[str, Any], argv: Optional[List[str]] = None) -> Path:
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    write_text_atomic(run_dir / "command.txt", command_line(argv) + "\n")
    write_text_atomic(run_dir / "git_revision.txt", git_revision() + "\n")
    return run_dir


def claim_run_dir(run_dir: Path, resume: Optional[str], checkpoint: Optional[Path]) -> RunFolder:
    """Lock ``run_dir`` for one training run (a second run gets RunFolderError naming the
    holder), remove the temporaries a killed run left in its checkpoints/, and refuse to
    start over a run the folder holds: a folder with checkpoints continues only from its
    own last.pt (``resume`` 'auto', or a ``checkpoint`` in its checkpoints/), so no run's
    last.pt, best.pt or logs are overwritten by a fresh run or by another folder's
    checkpoint. ``checkpoint`` is :func:`resolve_resume`'s answer for ``resume``."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    folder.lock(option="--run-dir")
    try:
        folder.remove_stale_files(("checkpoints",))
        ckpts = run_dir / "checkpoints"
        held = sorted(p.name for p in ckpts.glob("*.pt") if not p.name.startswith(".")) if ckpts.is_dir() else []
        # the folder a checkpoint lies in, its own symbolic link not followed
        own = checkpoint is not None and Path(checkpoint).absolute().parent.resolve() == ckpts.resolve()
        if held and not own:
            shown = first_few(held)
            start_again = "give another --run-dir, or delete the folder to start again"
            if checkpoint is not None:
                raise RunFolderError(f"{run_dir} holds a training run of its own (checkpoints/{shown}): continuing "
                                     f"{checkpoint} here would overwrite it; give that a new --run-dir, or continue "
                                     f"this folder's run with --resume auto")
            if resume == "auto":
                raise RunFolderError(f"{run_dir}: --resume auto finds no checkpoints/last.pt to continue (the folder "
                                     f"holds {shown}: weights only, not resumable); {start_again}")
            raise RunFolderError(f"{run_dir} holds a training run (checkpoints/{shown}): a fresh run here would "
                                 f"overwrite it; continue it with --resume auto, {start_again}")
    except BaseException:
        folder.unlock()
        raise
    return folder


def record_resume(run_dir: Path, checkpoint: Path, step: int, changes: List[str],
                  argv: Optional[List[str]] = None) -> None:
    """Append one line to ``run_dir``/resumes.txt: when, at which step, from which file
    (absolute), with which command, and what differs from the checkpoint (config.yaml and
    command.txt show only the latest segment of a run; this keeps the history)."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    command = command_line(argv)
    with open(Path(run_dir) / "resumes.txt", "a", encoding="utf-8") as f:
        f.write(f"{when} resumed at step {step} from {Path(checkpoint).absolute()} by `{command}`: "
                + ("; ".join(changes) if changes else "same settings and training pairs") + "\n")


def capture_rng(generators: Dict[str, torch.Generator]) -> Dict[str, Any]:
    """This process's random streams as plain data (tensors, lists, numbers: a checkpoint
    holding them loads with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": {"version": int(version), "state": [int(v) for v in mt], "gauss_next": gauss},
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any], generators: Dict[str, torch.Generator]) -> None:
    """Put back what :func:`capture_rng` took (also the tuple / NumPy-array form that
    earlier versions of this package wrote)."""
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(py["state"]), py["gauss_next"])
    random.setstate(py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = (npy["name"], np.asarray(npy["keys"].numpy(), dtype=np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    for k, g in generators.items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def configure_cuda(tf32: bool, deterministic: bool) -> None:
    """Process-wide CUDA settings for training. ``tf32``: cuDNN convolutions and matrix
    products may use TensorFloat-32 (PyTorch's default for convolutions; faster, ~3 digits).
    ``deterministic``: deterministic cuDNN / cuBLAS algorithms, so a resumed run repeats the
    uninterrupted one bit for bit (ops without a deterministic kernel warn)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


class CSVLog:
    """Append-only CSV with a fixed header; on resume, rows past ``step`` are dropped first so
    the log matches the checkpoint."""

    def __init__(self, path: Path, fields: List[str], resume_step: Optional[int] = None):
        self.path, self.fields = Path(path), fields
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r.get("step", 0))) <= resume_step]
            self._write(rows, "w")
        elif not self.path.is_file() or resume_step is None:
            self._write([], "w")

    def _write(self, rows, mode):
        with open(self.path, mode, newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if mode == "w":
                w.writeheader()
            w.writerows(rows)

    def append(self, row: Dict[str, Any]) -> None:
        self._write([{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}], "a")


def optional_tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """None/'' -> fresh run; 'auto' -> run_dir/checkpoints/last.pt if present; else a path."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(run_dir) / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if path.is_dir():
        raise FileNotFoundError(f"--resume {path} is a folder: give a checkpoint file (a run's "
                                f"checkpoints/last.pt), or --resume auto with that run's --run-dir")
    if not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
    return path


def load_training_state(path: Path, stage: int, trust: bool = False) -> Dict[str, Any]:
    """A resumable training checkpoint of ``stage``, read without unpickling code (see
    :func:`dsrdmpd.checkpoints.read_checkpoint`; ``trust`` allows a file that needs it)."""
    state = read_checkpoint(path, trust=trust)
    if not (isinstance(state, dict) and state.get("format") == PROJECT_FORMAT):
        raise CheckpointError(f"{path} is not a resumable dsrdmpd training checkpoint")
    if state.get("stage") != stage:
        raise CheckpointError(f"{path} is a stage-{state.get('stage')} checkpoint, this is the stage-{stage} trainer")
    if "optimizer" not in state:
        raise CheckpointError(f"{path} holds weights only (as best.pt and the step_<N>.pt snapshots do), not the "
                              f"optimizer and data state a resume needs: resume from the run's checkpoints/last.pt, "
                              f"or start a new run")
    return state


def make_loader(pairs, data_cfg: Dict[str, Any], batch_size: int, seed: int, start_micro: int, total_micro: int,
                rank: int, world: int, multiple: int) -> DataLoader:
    dataset = PairedImageDataset(pairs, crop=data_cfg.get("crop"), flip=bool(data_cfg.get("flip")),
                                 resize=data_cfg.get("resize"), resize_mode=data_cfg.get("resize_mode", "bilinear"),
                                 seed=seed, multiple=multiple)
    sampler = StepBatchSampler(len(dataset), batch_size, seed=seed, start_step=start_micro, total_steps=total_micro,
                               rank=rank, world=world)
    workers = int(data_cfg.get("num_workers", 0))
    # loader processes leave SIGINT / SIGTERM to the trainer, which finishes its step and saves
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      worker_init_fn=ignore_stop_signals if workers > 0 else None)


# Split names that hold a test set: validating (and choosing checkpoints) on them inflates
# the reported numbers, so it is only done when asked for, and then said loudly.
TEST_SPLIT_NAMES = ("test", "testing", "test_a", "test_b")


@dataclass
class DataPlan:
    """Training pairs, validation pairs and where the latter come from."""
    train: List[ImagePair]
    val: List[ImagePair]
    val_source: str          # e.g. "split 'valid'", "hold-out of 10 training pairs", "none"
    val_on_test: bool


def holdout_indices(n: int, k: int) -> List[int]:
    """k indices spread evenly over range(n) (the middle of each of k equal runs)."""
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def plan_data(data_cfg: Dict[str, Any]) -> DataPlan:
    """Training and validation pairs of a config's ``data`` section.

    Validation comes from ``val_split`` (a split that is not the test split, e.g.
    SateHaze1k's 'valid'), or from ``val_holdout: N`` (N training pairs, evenly spread in
    key order, taken out of training), or not at all. ``val_limit`` caps its size."""
    train = split_pairs(data_cfg, data_cfg.get("train_split", "train"))
    split, holdout = data_cfg.get("val_split"), data_cfg.get("val_holdout")
    if split and holdout:
        raise ConfigError("data.val_split and data.val_holdout are both set: choose one source of validation pairs")
    if holdout:
        k = int(holdout)
        if not 0 < k < len(train):
            raise ConfigError(f"data.val_holdout {k}: must be between 1 and {len(train) - 1} "
                             f"(the training split has {len(train)} pairs)")
        chosen = set(holdout_indices(len(train), k))
        val = [p for i, p in enumerate(train) if i in chosen]
        train = [p for i, p in enumerate(train) if i not in chosen]
        source = f"hold-out of {len(val)} training pairs"
    elif split:
        val = split_pairs(data_cfg, split)
        source = f"split {split!r}"
    else:
        val, source = [], "none"
    limit = data_cfg.get("val_limit")
    val = val[:int(limit)] if limit else val
    on_test = bool(split) and str(split).lower() in TEST_SPLIT_NAMES
    return DataPlan(train, val, source, on_test)


@torch.no_grad()
def sharded_validation(pairs, restore_fn, accelerator, protocol: str = "paper", panel_fn=None) -> Dict[str, float]:
    """Run ``restore_fn(hazy) -> dict of named outputs`` over the pairs, this process taking
    every world-th pair, and gather mean PSNR / SSIM of each output against GT."""
    from ..imageio import read_image
    rank, world = accelerator.process_index, accelerator.num_processes
    local = []
    names = None
    for i in range(rank, len(pairs), world):
        hazy, gt = read_image(pairs[i].hazy).tensor[None], read_image(pairs[i].gt).tensor[None]
        outs = restore_fn(hazy.to(accelerator.device))
        names = names or list(outs)
        row = []
        for n in names:
            m = psnr_ssim(outs[n].float().cpu(), gt, protocol)
            row += [m["psnr"][0], m["ssim"][0]]
        local.append(row)
        if panel_fn is not None and i < 4:
            panel_fn(pairs[i].key, hazy, outs, gt)
    width = 2 * len(names or [0])
    per_rank = math.ceil(len(pairs) / world)
    t = torch.full((per_rank, width), float("nan"), device=accelerator.device)
    if local:
        t[:len(local)] = torch.tensor(local, device=accelerator.device)
    allrows = accelerator.gather(t).reshape(-1, width).cpu()
    allrows = allrows[~torch.isnan(allrows).any(1)]
    result = {}
    for j, n in enumerate(names or []):
        result[f"psnr_{n}"] = float(allrows[:, 2 * j].mean())
        result[f"ssim_{n}"] = float(allrows[:, 2 * j + 1].mean())
    return result


def padded_forward(fn, hazy: torch.Tensor) -> torch.Tensor:
    """Apply a size-constrained network to any size by padding and cropping back."""
    h, w = hazy.shape[-2:]
    return fn(pad_to(hazy, padded_size(h, w)))[..., :h, :w]


class Throughput:
    def __init__(self):
        self.t0, self.n = time.perf_counter(), 0

    def tick(self) -> None:
        self.n += 1

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.n / dt if dt > 0 else float("nan")


def save_training_checkpoint(path: Path, **state) -> None:
    save_atomic({"format": PROJECT_FORMAT, "version": 1, **state}, path)


def progress(total: int, initial: int, desc: str, disable: bool):
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)
