"""Training loop skeleton shared by both stages (accelerate: one CPU/GPU, multi-GPU,
mixed precision, gradient accumulation; exact resume).

A subclass builds its model and optimizer in ``build()`` and defines ``compute_loss``,
``validate`` and what its checkpoints hold. The batch order is a function of the step
(``StepBatchSampler``) and every random draw comes from generators saved in the
checkpoint, so a resumed run continues bit for bit (on CPU) where it stopped.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from ..atomicfile import write_text_atomic
from ..config import ConfigError, check_keys, config_changes, validate_config
from ..data import DataError
from ..imageio import ImageReadError
from ..messages import first_few, one_line
from ..processes import on_main
from ..runfolder import RunFolder
from ..visualize import save_panel
from ..models.norm import set_fast_norm
from .common import (CSVLog, Throughput, capture_rng, claim_run_dir, configure_cuda, load_training_state,
                     make_loader, optional_tensorboard, plan_data, prepare_run_dir, progress, record_resume,
                     resolve_resume, restore_rng, save_training_checkpoint, seed_everything)
from .step_options import (GraphedTrainingStep, apply_precision, load_optimizer_state, make_adam, set_group_lr,
                           portable_optimizer_state, resolve_step_options, to_memory_format)
from .stopping import StopSignals, TrainingDiverged, TrainingInterrupted, TrainingStopped


def make_accelerator(device: str, mixed_precision: str, grad_accum: int) -> Accelerator:
    """An Accelerator with exactly these settings. accelerate keeps one state per process and
    silently keeps the first trainer's device (or refuses another mixed precision) for a
    second trainer in the same process (a notebook, stage 2 after stage 1); outside a
    distributed launch that state is started afresh.

    ``device`` 'auto' on a machine without CUDA means the CPU: under ``accelerate launch
    --multi_gpu --num_processes N`` the N processes then form one distributed CPU run (gloo),
    each on its shard of the data, instead of N separate runs that each take all of it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu)
    check_one_run(accelerator.num_processes)
    return accelerator


def check_one_run(num_processes: int) -> None:
    """Refuse a launch whose processes do not form one distributed run (WORLD_SIZE > 1 but
    accelerate sees a single process): each would train on all the data and write the same
    files."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and num_processes != world:
        raise ConfigError(f"launched as {world} processes (WORLD_SIZE={world}) but they do not form one distributed "
                          f"run ({num_processes} process seen by accelerate): each would train on all the data and "
                          f"overwrite the others' checkpoints; use train.device=cpu for a CPU run, or launch one "
                          f"process")


def loader_error_text(exc: BaseException) -> str:
    """The problem of a loader error in one line: a loader process's error comes back with
    its traceback in the message ('Caught DataError in DataLoader worker process 0 ...
    Original Traceback ...'); only its last line, the problem itself, is kept."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        name, sep, rest = last.partition(": ")
        return rest if sep and name.replace(".", "").replace("_", "").isalnum() else last
    return one_line(exc)


class BaseTrainer:
    stage: int = 0
    size_multiple: int = 1
    length_key: str = ""            # the train key that sets the run's length: 'epochs' (stage 1) or 'steps' (stage 2)
    train_defaults: Dict[str, Any] = {}
    # train keys read without a default value: device ('auto' | 'cpu'), tensorboard, val_protocol, val_every,
    # save_every (last.pt), keep_every (step_<N>.pt snapshots), tf32 and deterministic (CUDA only, see
    # configure_cuda), precision, channels_last, fused_optimizer, cuda_graph (see step_options), fast_norm
    # (the stage-2 GroupNorms' Triton kernels with their backward, CUDA only)
    train_options = ("device", "tensorboard", "val_protocol", "val_every", "save_every", "keep_every", "tf32",
                     "deterministic", "precision", "channels_last", "fused_optimizer", "cuda_graph", "fast_norm")
    data_keys = ("preset", "root", "train_split", "val_split", "val_holdout", "val_limit", "crop", "flip", "resize",
                 "resize_mode", "num_workers", "hazy_dir", "gt_dir", "hazy_key", "gt_key", "list_file")

    def __init__(self, cfg: Dict[str, Any], run_dir, resume: Optional[str] = None, argv: Optional[List[str]] = None,
                 trust: bool = False):
        other = {"epochs": "steps", "steps": "epochs"}.get(self.length_key)
        if other in (cfg.get("train") or {}):
            raise ConfigError(f"train.{other}: stage {self.stage} runs for train.{self.length_key} "
                              f"({self.train_defaults[self.length_key]} by default), not train.{other}; set "
                              f"train.{self.length_key}, or use --max-steps to stop early")
        check_keys("train", cfg.get("train") or {}, (*self.train_defaults, *self.train_options))
        check_keys("data", cfg.get("data") or {}, self.data_keys)
        validate_config(cfg)
        cfg["train"] = {**self.train_defaults, **(cfg.get("train") or {})}
        self.cfg = cfg
        self.tcfg = cfg["train"]
        self.run_dir = Path(run_dir)
        self.trust = bool(trust)      # checkpoints that need arbitrary unpickling may be read (--trust-checkpoint)
        device = str(self.tcfg.get("device", "auto"))
        apply_precision(self.tcfg)
        self.accelerator = make_accelerator(device, self.tcfg.get("mixed_precision", "no"),
                                            int(self.tcfg.get("grad_accum", 1)))
        self.step_options = resolve_step_options(self.tcfg, self.accelerator.device.type,
                                                 self.accelerator.num_processes,
                                                 self.accelerator.gradient_accumulation_steps)
        if self.accelerator.device.type == "cuda":
            configure_cuda(bool(self.tcfg.get("tf32", True)), bool(self.tcfg.get("deterministic", True)))
        self.is_main = self.accelerator.is_main_process
        path = resolve_resume(resume, self.run_dir)
        # the folder is held from here until train() returns (or close()): one run per folder;
        # the main process takes it, and a refusal stops every process
        self.run_folder: Optional[RunFolder] = None
        self._resume_record: Optional[Tuple[Path, int, List[str]]] = None
        self._argv = argv
        on_main(lambda: setattr(self, "run_folder", claim_run_dir(self.run_dir, resume, path)),
                self.accelerator.process_index)
        try:
            self.seed = int(self.tcfg.get("seed", 0))
            seed_everything(self.seed)
            plan = plan_data(cfg["data"])
            self.train_pairs, self.val_pairs, self.val_on_test = plan.train, plan.val, plan.val_on_test
            self.val_source = plan.val_source
            if self.val_on_test:
                self._warn_test_validation()
            self.batch_size = int(self.tcfg["batch_size"])
            world, accum = self.accelerator.num_processes, self.accelerator.gradient_accumulation_steps
            self.micro_per_step = world * accum
            self.steps_per_epoch = len(self.train_pairs) // (self.batch_size * self.micro_per_step)
            if self.steps_per_epoch < 1:
                raise DataError(f"{len(self.train_pairs)} training pairs are fewer than one optimizer step "
                                 f"(batch {self.batch_size} x accumulation {accum} x {world} processes)")
            self.generators: Dict[str, torch.Generator] = {}
            self.step = 0
            self.best: Dict[str, Any] = {"psnr": -math.inf, "step": None}
            self.build()
            if self.tcfg.get("fast_norm", False):     # no effect on the CPU, which keeps the native norms
                for net in (self.model, getattr(getattr(self, "ema", None), "ema_model", None)):
                    if net is not None:
                        set_fast_norm(net, True)
            if self.step_options.channels_last:
                self.model.to(memory_format=torch.channels_last)
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
            self.graph_step = (GraphedTrainingStep(self.loss_from, self.model, self.optimizer)
                               if self.step_options.cuda_graph else None)
            changes: List[str] = []
            if path is not None:
                state = load_training_state(path, self.stage, self.trust)
                self.load_state(state)
                saved_train = (state.get("config") or {}).get("train") or {}
                self.apply_configured_rates({**self.train_defaults, **saved_train})
                changes = self.resume_changes(state)
            # the run folder's records are written only once the run can start: a start that
            # fails (bad data, a wrong checkpoint) leaves an existing run's config.yaml as it was
            if self.is_main:
                prepare_run_dir(self.run_dir, cfg, argv)
            self.accelerator.wait_for_everyone()
            if path is not None:
                self.accelerator.print(f"resumed from {path} at step {self.step}")
                for line in changes:
                    self.accelerator.print(f"WARNING: {line}")
                if changes:
                    self.accelerator.print("WARNING: so this run will not repeat an uninterrupted one exactly")
                self._resume_record = (path, self.step, changes)     # into resumes.txt when training starts
            self.saved_step = self.step if path is not None else None      # the step last.pt holds (None: fresh)
            self.train_log = CSVLog(self.run_dir / "train_log.csv", ["step", "epoch", "loss", "lr", "it_per_s"],
                                    self.saved_step) if self.is_main else None
            self.val_fields = ["step", "epoch"] + self.val_metric_names()
            self.val_log = CSVLog(self.run_dir / "val_log.csv", self.val_fields, self.saved_step) if self.is_main else None
            self.tb = optional_tensorboard(self.run_dir, bool(self.tcfg.get("tensorboard", False))) if self.is_main else None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let go of the run folder (train() does so when it returns); idempotent."""
        if self.run_folder is not None:
            self.run_folder.unlock()

    def _warn_test_validation(self) -> None:
        msg = (f"WARNING: validating on the test split ({self.val_source}). Its numbers are logged, but no best.pt "
               f"is chosen from them: picking a checkpoint on the test set makes reported results optimistic. "
               f"Use a validation split (data.val_split) or a hold-out of the training set (data.val_holdout).")
        self.accelerator.print(msg)
        if self.is_main:
            write_text_atomic(self.run_dir / "VALIDATION_ON_TEST_SPLIT.txt", msg + "\n")

    # ---- subclass interface
    def build(self) -> None:
        raise NotImplementedError

    def total_steps(self) -> int:
        raise NotImplementedError

    def step_inputs(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        """The device tensors one step's loss is a function of (every random draw made here,
        on the host: a captured step replays device work only)."""
        raise NotImplementedError

    def loss_from(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The loss of :meth:`step_inputs`' tensors (device work only)."""
        raise NotImplementedError

    def compute_loss(self, batch: Dict[str, Any]) -> torch.Tensor:
        return self.loss_from(*self.step_inputs(batch))

    def make_optimizer(self, params, lr: float, **kwargs) -> torch.optim.Adam:
        """Adam in the implementation the step options choose (see step_options)."""
        return make_adam(params, lr, self.step_options, self.accelerator.device, **kwargs)

    def device_inputs(self, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``tensors`` on the training device, channels-last when ``train.channels_last``."""
        dev = self.accelerator.device
        return to_memory_format(tuple(t.to(dev) for t in tensors), self.step_options.channels_last)

    def restore_outputs(self, hazy: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def val_metric_names(self) -> List[str]:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        pass

    def end_of_epoch(self) -> None:
        pass

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    def apply_configured_rates(self, saved: Dict[str, Any]) -> None:
        """After a resume, train with this run's ``train.lr`` and ``betas``, not the checkpoint's
        (which the optimizer's state brought back): lowering ``train.lr`` after a NaN loss must
        take effect. Only a setting that changed is touched, so an unchanged resume stays exact.
        ``saved``: the checkpoint's ``train`` section."""
        lr, betas = self.tcfg.get("lr"), self.tcfg.get("betas")
        for group in self.optimizer.param_groups:
            if lr is not None and saved.get("lr") is not None and float(saved["lr"]) != float(lr):
                set_group_lr(group, float(lr))
            if betas is not None and saved.get("betas") is not None and list(saved["betas"]) != list(betas):
                group["betas"] = tuple(float(b) for b in betas)

    def weights_for_inference(self) -> Dict[str, Any]:
        return {"model": self.unwrapped_state(), "ema": None}

    # ---- shared machinery
    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def unwrapped_state(self) -> Dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "net") and self.stage == 2:
            model = model.net
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def state(self, rng: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The resumable state (plain data: loads with ``weights_only=True``); ``rng`` holds
        every process's random streams, indexed by process."""
        scaler = self.accelerator.scaler
        return {"stage": self.stage, "config": self.cfg, "step": self.step, "epoch": self.epoch,
                **self.weights_for_inference(),
                "optimizer": portable_optimizer_state(self.optimizer),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng, "processes": self.accelerator.num_processes, "best": self.best,
                "train_keys": [p.key for p in self.train_pairs], **self.extra_state()}

    def gather_rng(self) -> List[Dict[str, Any]]:
        """Every process's random streams, in process order (all processes must call it)."""
        from accelerate.utils import gather_object
        return list(gather_object([capture_rng(self.generators)]))

    def restore_own_rng(self, rng: Any) -> None:
        """Each process restores the random streams it saved itself. Files of earlier
        versions hold one state (the main process's): only the main process restores it."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if isinstance(rng, dict):
            rng = [rng]
        if len(rng) != world:
            self.accelerator.print(f"WARNING: the checkpoint holds the random state of {len(rng)} process(es), this "
                                   f"run has {world}: processes without a saved state keep their fresh seeds, so "
                                   f"the run will not repeat an uninterrupted one exactly")
        if rank < len(rng):
            restore_rng(rng[rank], self.generators)

    # train / data keys that change no number of the run (where and how often it logs,
    # saves, validates; loader processes): free to change between a stop and its resume
    BOOKKEEPING_KEYS = ("train.tensorboard", "train.log_every", "train.save_every",
                        "train.keep_every", "train.val_every", "data.num_workers")

    def resume_changes(self, state: Dict[str, Any]) -> List[str]:
        """Why this resumed run will not repeat the uninterrupted one, one line each (none
        when it will): settings that differ from the checkpoint's (bookkeeping keys aside),
        and training pairs added, removed or reordered since (checkpoints older than this
        record skip that)."""
        lines = []
        changed = config_changes(state.get("config") or {}, self.cfg, self.BOOKKEEPING_KEYS)
        if changed:
            lines.append(f"resuming with {len(changed)} setting(s) other than the checkpoint's: "
                         + "; ".join(changed))
        then, now = state.get("train_keys"), [p.key for p in self.train_pairs]
        if isinstance(then, list) and then != now:
            added, removed = sorted(set(now) - set(then)), sorted(set(then) - set(now))
            what = ", ".join(part for part in (
                f"{len(added)} added ({first_few(added)})" if added else "",
                f"{len(removed)} removed ({first_few(removed)})" if removed else "") if part) \
                or "the same pairs in another order"
            lines.append(f"the training pairs differ from the checkpoint's ({len(then)} then, {len(now)} now: "
                         f"{what})")
        return lines

    def load_state(self, state: Dict[str, Any]) -> None:
        model = self.accelerator.unwrap_model(self.model)
        target = model.net if self.stage == 2 and hasattr(model, "net") else model
        target.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.restore_own_rng(state["rng"])
        self.step, self.best = int(state["step"]), state.get("best", self.best)
        self.load_extra_state(state)

    def save(self, name: str = "last.pt") -> None:
        self.accelerator.wait_for_everyone()
        rng = self.gather_rng()
        if self.is_main:
            self.write_checkpoint(name, self.state(rng))
        if name == "last.pt":
            self.saved_step = self.step

    def last_saved(self) -> str:
        """Where a stopped run can continue from, in words."""
        if self.saved_step is None:
            return "no checkpoints/last.pt was written yet"
        return f"checkpoints/last.pt holds step {self.saved_step}"

    def write_checkpoint(self, name: str, state: Dict[str, Any]) -> None:
        """Write ``checkpoints/<name>`` atomically; a failed write (disk full, quota, a
        vanished folder) stops the run in one line naming the file, the free space and the
        step to continue from (the file it would have replaced is intact)."""
        path = self.run_dir / "checkpoints" / name
        try:
            save_training_checkpoint(path, **state)
        except (OSError, RuntimeError) as exc:          # torch.save reports a full disk as RuntimeError
            try:
                free = f"{shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MiB free there"
            except OSError:
                free = "free space unknown"
            raise TrainingStopped(f"could not write {path} at step {self.step} ({free}): {one_line(exc)}; "
                                  f"{self.last_saved()} (unchanged); make room and continue with "
                                  f"--resume auto") from exc

    def val_weights(self) -> str:
        """Which weights validation scores ('model' or 'ema'); best.pt records it."""
        return "model"

    def save_weights(self, name: str, ema: bool = True, **extra) -> None:
        """Inference weights only (no optimizer): best.pt and the step_<N>.pt snapshots
        (``ema=False`` leaves the EMA copy out, halving a snapshot's size)."""
        if self.is_main:
            weights = self.weights_for_inference()
            if not ema:
                weights["ema"] = None
            self.write_checkpoint(name, dict(stage=self.stage, config=self.cfg, step=self.step, **weights, **extra))

    def save_best(self) -> None:
        self.save_weights("best.pt", selected_with=self.val_weights(), selected_on=self.val_source)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def validate(self) -> Optional[Dict[str, float]]:
        if not self.val_pairs:
            return None
        was_training = self.model.training
        self.model.eval()
        panel_dir = self.run_dir / "samples" / f"step_{self.step:07d}"

        def panel(key, hazy, outs, gt):
            if self.is_main:
                save_panel([("hazy", hazy)] + [(n, o.clamp(0, 1)) for n, o in outs.items()] + [("GT", gt)],
                           panel_dir / f"{key}.png")

        from .common import sharded_validation
        metrics = sharded_validation(self.val_pairs, self.restore_outputs, self.accelerator,
                                     self.tcfg.get("val_protocol", "paper"), panel)
        self.model.train(was_training)
        return metrics

    def _log_val(self, metrics: Dict[str, float]) -> None:
        key = self.val_metric_names()[0]
        if not self.val_on_test and metrics[key] > self.best["psnr"]:
            self.best = {"psnr": metrics[key], "step": self.step, "metric": key}
            self.save_best()
        if self.is_main:
            self.val_log.append({"step": self.step, "epoch": self.epoch, **metrics})
            if self.tb:
                for k, v in metrics.items():
                    self.tb.add_scalar(f"val/{k}", v, self.step)
            self.accelerator.print(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def train(self, max_steps: Optional[int] = None) -> Dict[str, Any]:
        """Train until the configured length (or ``max_steps``, as if interrupted there); the
        run folder is let go when it returns or fails (and taken again by a later call)."""
        if max_steps is not None and max_steps <= self.step:
            raise ConfigError(f"--max-steps {max_steps}: the run is already at step {self.step} (--max-steps counts "
                              f"the run's steps from its start)" if self.step else
                              f"--max-steps {max_steps}: must be at least 1")
        if self.run_folder is not None and not self.run_folder.locked:
            self.run_folder.lock(option="--run-dir")
        if self._resume_record is not None and self.is_main:
            record_resume(self.run_dir, *self._resume_record, self._argv)
        self._resume_record = None
        try:
            with StopSignals() as signals:
                return self._train(max_steps, signals)
        finally:
            self.close()

    def check_loss(self, value: float) -> None:
        """Stop on a NaN or infinite loss (training on would only turn the weights to NaN).
        Nothing of this step is saved; last.pt keeps the last good one."""
        if math.isfinite(value):
            return
        raise TrainingDiverged(
            f"the loss is {value} at step {self.step + 1} (epoch {self.step // self.steps_per_epoch}) of the "
            f"stage-{self.stage} run in {self.run_dir}: training stopped, nothing of this step saved "
            f"({self.last_saved()}); train_log.csv shows the loss before it. Resuming with the same settings "
            f"repeats this step exactly: lower train.lr, set train.grad_clip or check the data first")

    def stop_requested(self, signals: StopSignals) -> bool:
        """Whether a stop signal reached this process or, in a distributed run, any process
        (all then stop after the same step)."""
        flag = signals.received is not None
        if self.accelerator.num_processes > 1:
            t = torch.tensor([float(flag)], device=self.accelerator.device)
            flag = bool(self.accelerator.reduce(t, reduction="sum").item() > 0)
        return flag

    def _train(self, max_steps: Optional[int], signals: StopSignals) -> Dict[str, Any]:
        total = self.total_steps()
        stop = min(total, max_steps) if max_steps else total
        loader = make_loader(self.train_pairs, self.cfg["data"], self.batch_size, self.seed,
                             self.step * self.micro_per_step, stop * self.micro_per_step,
                             self.accelerator.process_index, self.accelerator.num_processes, self.size_multiple)
        self.model.train()
        speed = Throughput()
        with progress(stop, self.step, f"stage {self.stage}", not self.is_main) as bar:  # closed before any message
            self._loop(loader, bar, speed, total, stop, signals)
        self.accelerator.wait_for_everyone()
        return {"step": self.step, "total": total, "best": self.best, "it_per_s": speed.rate(),
                "run_dir": str(self.run_dir)}

    def batches(self, loader):
        """The loader's batches; a batch that cannot be made (an unreadable image, a pair of
        two sizes met mid-run) first saves the steps done to last.pt, then stops the run with
        the problem and the step to continue from. Saved only with one process and no
        gradient accumulation, where every batch starts a step: a distributed run cannot
        save while the others are in a step, and half an accumulated step is no resume point."""
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as exc:
                # loader processes are ended now: the error's traceback keeps the loader alive in a
                # reference cycle, and an exit would wait for them for ever
                getattr(it, "_shutdown_workers", lambda: None)()
                if self.micro_per_step == 1 and self.step > 0 and self.saved_step != self.step:
                    self.save()
                note = (f"; {self.last_saved()}: fix the data and continue with --resume auto "
                        f"(the resumed run names the pairs that changed)")
                if isinstance(exc, (DataError, ImageReadError)):
                    raise DataError(f"at step {self.step + 1}: {loader_error_text(exc)}{note}") from exc
                raise TrainingStopped(f"at step {self.step + 1}: {type(exc).__name__}: {loader_error_text(exc)}"
                                      f"{note}") from exc
            yield batch

    def _loop(self, loader, bar, speed: Throughput, total: int, stop: int, signals: StopSignals) -> None:
        """The steps from ``self.step`` to ``stop`` (of ``total``); a stop signal ends them
        after the step under way, saved (TrainingInterrupted)."""
        log_every = int(self.tcfg.get("log_every", 10))
        val_every = int(self.tcfg.get("val_every") or self.steps_per_epoch)
        save_every = int(self.tcfg.get("save_every") or self.steps_per_epoch)
        keep_every = int(self.tcfg.get("keep_every") or 0)
        clip = self.tcfg.get("grad_clip")
        running, count = 0.0, 0
        for batch in self.batches(loader):
            if self.step >= stop:
                break
            with self.accelerator.accumulate(self.model):
                if self.graph_step is not None:         # forward, backward and Adam in one replay
                    loss = self.graph_step(*self.step_inputs(batch))
                else:
                    loss = self.compute_loss(batch)
                    self.accelerator.backward(loss)
                    if clip and self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.model.parameters(), float(clip))
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            self.check_loss(value)
            running += value
            count += 1
            if not self.accelerator.sync_gradients:
                continue
            self.step += 1
            speed.tick()
            self.after_optimizer_step()
            if self.step % self.steps_per_epoch == 0:
                self.end_of_epoch()
            bar.update(1)
            if self.step % log_every == 0 or self.step == stop:
                avg = running / max(count, 1)
                bar.set_postfix(loss=f"{avg:.4f}", lr=f"{self.lr():.2e}")
                if self.is_main:
                    self.train_log.append({"step": self.step, "epoch": self.epoch, "loss": avg, "lr": self.lr(),
                                           "it_per_s": speed.rate()})
                    if self.tb:
                        self.tb.add_scalar("train/loss", avg, self.step)
                running, count = 0.0, 0
            if self.step % val_every == 0 or self.step == total:
                metrics = self.validate()
                if metrics:
                    self._log_val(metrics)
            if keep_every and self.step % keep_every == 0:
                self.accelerator.wait_for_everyone()
                self.save_weights(f"step_{self.step:07d}.pt", ema=self.val_weights() == "ema")
            if self.step % save_every == 0 or self.step == stop:
                self.save()
            if self.step < stop and self.stop_requested(signals):
                if self.saved_step != self.step:
                    self.save()
                name = signals.received or "a stop signal (on another process)"
                raise TrainingInterrupted(
                    f"stopped by {name} after step {self.step} of {total}: checkpoints/last.pt in {self.run_dir} "
                    f"holds it; continue with --resume auto", signals.signum or 15)
