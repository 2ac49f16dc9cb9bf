"""The single training loop every method shares, and evaluation.

Task loss when labels exist (cross-entropy, MSE or BCE), distillation from the frozen original
otherwise (or both, weighted). Methods add loss terms and after-step hooks; they never own a loop.
"""
from __future__ import annotations

import os
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from . import distributed, outdir
from .data import Dataset, split_batch, to_device
from .errors import CompressError, UserError, first_line
from .losses import distill_loss, task_loss
from .progress import bar as progress_bar
from .metrics import primary_output


@dataclass
class TrainResult:
    steps: int
    epochs: float
    seconds: float
    samples_per_s: float
    final_loss: float | None
    loss_terms: dict[str, float] | None = None  # the terms of the last step's loss, by name


def make_optimizer(params: Iterable[nn.Parameter], cfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def total_steps(cfg, n_samples: int, batch_size: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return cfg.epochs * max(1, n_samples // batch_size)  # the loop drops the last partial batch


@dataclass
class ResumePoint:
    """Where the fine-tuning loop keeps its resumable state, and how often it writes it.

    The state (weights, optimizer, scheduler, RNG states, data order, method state, step) is
    written atomically every `every` steps and when the run is interrupted (SIGINT); `resume`
    continues from it. `identity` must match for a resume to be accepted (same recipe, model, seed).
    """

    path: Path
    every: int = 0
    resume: bool = False
    identity: dict = field(default_factory=dict)


class Interrupted(CompressError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143) during fine-tuning, after the state was saved."""

    exit_code = 130

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


SIGNALS = (signal.SIGINT, signal.SIGTERM)
TEST_SIGNAL_ENV = "COMPRESS_TEST_SIGNAL_AT_STEP"


def _start(model: nn.Module, teacher: nn.Module | None, methods, device: torch.device, steps: int) -> None:
    """Student in training mode, the teacher frozen in eval mode, both on `device`; methods' hooks
    (each told how many optimizer steps the loop will take)."""
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    for method in methods:
        method.finetune_steps = steps
        method.start_finetune(model, teacher)


def _loss_terms(model, forward, teacher, batch, inputs, target, cfg, has_labels: bool, distill_weight: float,
                methods, output_kind: str) -> dict[str, torch.Tensor]:
    """The step's loss by term: the task loss on labels, the distillation from the teacher's outputs
    (when `teacher` runs), and each method's own terms (named `method.term`)."""
    ref = None
    if teacher is not None:
        with torch.no_grad():
            ref = primary_output(teacher(*inputs))
    outputs = forward(*inputs)
    out = primary_output(outputs)
    terms: dict[str, torch.Tensor] = {}
    if has_labels:
        terms["task"] = task_loss(cfg.loss, out, target, output_kind)
    if distill_weight > 0:
        distill = distill_loss(cfg.distill.loss, out, ref, cfg.distill.temperature, output_kind)
        _check_distillation_sees(distill, out, ref, cfg.distill.loss, output_kind)
        terms["distill"] = distill_weight * distill
    for method in methods:
        terms.update({f"{method.name}.{k}": v for k, v in method.loss(model, batch, outputs).items()})
    return terms


def _check_finite(loss: torch.Tensor, terms: dict, step: int, checkpoint) -> None:
    """A loss that is not finite on any process stops the run, naming the term and the last good state."""
    if not distributed.all_true(bool(torch.isfinite(loss))):
        bad = [k for k, v in terms.items() if not torch.isfinite(v)] or ["(on another process)"]
        kept = f"; the last good state is in {checkpoint.path}" if checkpoint and checkpoint.path.exists() else ""
        raise UserError(f"fine-tuning diverged at step {step}: loss term {', '.join(bad)} is "
                        f"{float(loss.detach())}; lower finetune.lr or set finetune.clip_grad_norm{kept}")


def _optimizer_step(model, optimizer, scheduler, loss, cfg, methods, step: int) -> None:
    """Backward, clip, step, schedule, then each method's after-step hook (projections, prox) at the
    learning rate the step used."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad_norm:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    for method in methods:
        method.after_step(model, step, lr, optimizer)


def finetune(model: nn.Module, data: Dataset, input_names: list[str], target_key: str, cfg, batch_size: int, *,
             teacher: nn.Module | None = None, methods=(), device: torch.device = torch.device("cpu"),
             seed: int = 0, progress: bool = True, desc: str = "fine-tune",
             checkpoint: ResumePoint | None = None, output_kind: str = "logits") -> TrainResult:
    """Train `model` in place for the steps `cfg` asks (a FinetuneSection); returns throughput figures.
    `output_kind` says what the model returns (logits, probabilities, log_probabilities), for the losses."""
    steps = total_steps(cfg, len(data), batch_size)
    if steps == 0:
        return TrainResult(0, 0.0, 0.0, 0.0, None)
    has_labels = target_key in data.keys()
    distill_weight, run_teacher = _distillation(cfg, has_labels, methods, teacher)
    rank, processes = distributed.world()
    if batch_size % processes:
        raise UserError(f"data.batch_size {batch_size} must be divisible by the {processes} processes")
    _start(model, teacher, methods, device, steps)
    # every process trains on its slice of each global batch; DDP averages the gradients
    forward = nn.parallel.DistributedDataParallel(model) if processes > 1 else model
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
                 if cfg.schedule == "cosine" else None)
    generator = torch.Generator().manual_seed(seed)
    loop = {"step": 0, "epoch_generator": generator.get_state(), "batch": 0}
    if checkpoint is not None and checkpoint.resume:
        loop = _restore(checkpoint, model, optimizer, scheduler, generator, methods)
    state = _Progress(loop["step"], steps)
    interrupted: list[int] = []
    previous_handlers = _catch_signals(interrupted)
    bar = progress_bar(steps, desc, "step", enabled=progress and rank == 0, initial=state.step)
    try:
        skip = loop["batch"]  # batches of the current epoch trained before a resume
        while state.step < steps:
            # the generator's state before this epoch's shuffle fixes its data order, for a resume
            loop["epoch_generator"], loop["batch"] = generator.get_state(), skip
            for index, batch in enumerate(data.batches(batch_size, shuffle=True, generator=generator, drop_last=True,
                                                       trim=True)):
                if index < skip:
                    continue  # batches this epoch already trained on before the resume
                if processes > 1:
                    batch = {k: v[rank::processes] for k, v in batch.items()}
                batch = to_device(batch, device)
                inputs, target = split_batch(batch, input_names, target_key)
                terms = _loss_terms(model, forward, teacher if run_teacher else None, batch, inputs, target, cfg,
                                    has_labels, distill_weight, methods, output_kind)
                loss = sum(terms.values())
                _check_finite(loss, terms, state.step, checkpoint)
                _optimizer_step(model, optimizer, scheduler, loss, cfg, methods, state.step)
                state.record(loss, terms, inputs[0].shape[0] * processes, bar)
                loop.update(step=state.step, batch=index + 1)
                _test_signal(state.step)
                if checkpoint is not None and rank == 0 and (interrupted or (checkpoint.every and state.step % checkpoint.every == 0)):
                    _save_state(checkpoint, loop, model, optimizer, scheduler, methods)
                if interrupted:
                    raise _interruption(interrupted[0], state, checkpoint)
                if state.step >= steps:
                    break
            skip = 0
    finally:
        bar.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    seconds = time.perf_counter() - state.start
    model.eval()
    return TrainResult(steps, state.samples / len(data), seconds, state.samples / max(seconds, 1e-9), state.loss,
                       state.terms)


def _distillation(cfg, has_labels: bool, methods, teacher: nn.Module | None) -> tuple[float, bool]:
    """(the output distillation's weight, whether the teacher runs): without labels the loop
    distills the outputs, unless a method brings its own distillation."""
    method_distills = any(m.uses_teacher for m in methods)
    distill_weight = cfg.distill.weight if has_labels or method_distills else (cfg.distill.weight or 1.0)
    run_teacher = distill_weight > 0 or method_distills
    if run_teacher and teacher is None:
        raise UserError("distillation needs the original model as teacher")
    return distill_weight, run_teacher


def _interruption(signum: int, state: "_Progress", checkpoint: ResumePoint | None) -> Interrupted:
    where = f"; its state is in {checkpoint.path}: rerun with --resume" if checkpoint else ""
    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    return Interrupted(f"{what} at step {state.step} of {state.steps}{where}", signum)


class _Progress:
    """Where the loop is: the step, the samples seen, the last loss (averaged over the processes,
    each of which saw a slice of the batch) and its terms, and the progress bar's figures."""

    def __init__(self, step: int, steps: int):
        self.step, self.steps, self.samples = step, steps, 0
        self.loss: float | None = None
        self.terms: dict[str, float] | None = None
        self.start = time.perf_counter()

    def record(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], samples: int, bar) -> None:
        self.step += 1
        self.samples += samples
        self.loss, *values = distributed.mean([float(loss.detach())] + [float(v.detach()) for v in terms.values()])
        self.terms = {k: round(v, 6) for k, v in zip(terms, values)}
        elapsed = time.perf_counter() - self.start
        bar.set_postfix(loss=f"{self.loss:.4f}", samples_s=f"{self.samples / max(elapsed, 1e-9):.0f}", refresh=False)
        bar.update(1)


def _check_distillation_sees(distill: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, loss: str,
                             kind: str) -> None:
    """A distillation loss that is exactly zero while the student's outputs differ from the
    teacher's cannot see those outputs: training on it trains on nothing. Stop and say so."""
    if float(distill.detach()) == 0.0:
        s, t = student.detach().float(), teacher.detach().float()
        if loss == "kl" and kind == "logits" and s.dim() >= 2 and s.shape[-1] > 1:
            # logits shifted by a constant per row are the same distribution: a KL of 0 is then right
            s, t = s.log_softmax(-1), t.log_softmax(-1)
        gap = float((s - t).abs().max()) if s.numel() else 0.0
        if gap > 1e-5:
            raise UserError(f"distillation loss {loss} is exactly 0 while the student's outputs differ from the "
                            f"original's by up to {gap:.3g} ({kind} of shape {list(student.shape)}): it cannot see "
                            "these outputs; set finetune.output or finetune.distill.loss")


def _catch_signals(flag: list) -> dict:
    """Turn Ctrl-C and SIGTERM into a flag the loop checks after each step (main thread only);
    the previous handlers, to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, lambda signum, frame: flag.append(signum)) for signum in SIGNALS}


def _test_signal(step: int) -> None:
    """Tests only: COMPRESS_TEST_SIGNAL_AT_STEP=N:NAME sends this process signal NAME (INT, TERM,
    KILL) right after step N, so that tests interrupt a run at a known step instead of racing it."""
    spec = os.environ.get(TEST_SIGNAL_ENV)
    if not spec:
        return
    at, _, name = spec.partition(":")
    if at.isdigit() and int(at) == step and name in ("INT", "TERM", "KILL"):
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


def _save_state(checkpoint: ResumePoint, loop: dict, model, optimizer, scheduler, methods) -> None:
    state = {"identity": checkpoint.identity, "loop": loop, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
             "torch_rng": torch.get_rng_state(), "methods": [m.state_dict() for m in methods]}
    outdir.own_dir(checkpoint.path.parent)  # never through a symbolic link planted beside --out
    outdir.write_atomic(checkpoint.path, lambda f: torch.save(state, f))  # a kill leaves the old state or the new


def _restore(checkpoint: ResumePoint, model, optimizer, scheduler, generator, methods) -> dict:
    try:
        info = os.lstat(checkpoint.path)
    except OSError:
        raise UserError(f"--resume: no saved state at {checkpoint.path}; run without --resume") from None
    if not stat.S_ISREG(info.st_mode) or not stat.S_ISDIR(os.lstat(checkpoint.path.parent).st_mode):
        raise UserError(f"{checkpoint.path}: not a resume state written by compress (a symbolic link or another "
                        "kind of file); run without --resume to start over")
    try:
        state = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler runs no code
        raise UserError(f"{checkpoint.path}: unreadable resume state ({first_line(exc, 120)})") from None
    keys = ("identity", "loop", "model", "optimizer", "scheduler", "torch_rng", "methods")
    if not isinstance(state, dict) or any(k not in state for k in keys) or not isinstance(state["loop"], dict):
        raise UserError(f"{checkpoint.path}: not a resume state written by compress; run without --resume to start over")
    if state.get("identity") != checkpoint.identity:
        raise UserError(f"{checkpoint.path}: saved by a different run (recipe, model or seed changed); "
                        "run without --resume to start over")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        for method, method_state in zip(methods, state["methods"]):
            method.load_state_dict(method_state)
        generator.set_state(state["loop"]["epoch_generator"])
        loop = dict(state["loop"])
        if not all(isinstance(loop.get(k), int) and loop[k] >= 0 for k in ("step", "batch")):
            raise ValueError("bad step or batch")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise UserError(f"{checkpoint.path}: a damaged resume state ({first_line(exc, 100)}); "
                        "run without --resume to start over") from None
    return loop


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, input_names: list[str], batch_size: int,
            device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The model's primary output on every sample, in order, on the CPU."""
    model.to(device).eval()
    outs = []
    for batch in data.batches(batch_size):
        inputs = tuple(batch[n].to(device) for n in input_names)
        outs.append(primary_output(model(*inputs)).float().cpu())
    return torch.cat(outs)
