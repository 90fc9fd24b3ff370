"""One training run as the host sees it: progress and events per step, periodic and final saves, what is
kept when it stops early, and the report.

The host (ComfyUI: nodes/train_host.py) is reached through the small ``Host`` protocol, as the model is
through ``Denoiser``: progress bar, Cancel, front-end events, folders. So saving and resuming are plain
torch code with unit tests of their own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Protocol

import torch

from ..lora.files import save_lora_file
from ..loss_plot import loss_curve_image
from ..messages import LoraLabError, user_error
from . import interrupted_runs, run_reuse, saves
from .loop import NonFiniteLoss, StepReport
from .saves import SaveFolders
from .validation import VALIDATION_KEY, HeldOut, ValidationHistory, history_key

log = logging.getLogger("LoRA Lab")
CHART_LOSSES = 5000      # losses sent to the front end's chart (the loss_curve picture draws them all)


class Host(Protocol):
    """What a training run needs from the application it runs in."""
    node_name: str                 # who speaks in messages ("Train LoRA")
    save_folders: SaveFolders

    def progress(self, step: int, total: int) -> None:
        """Show ``step`` of ``total`` (a progress bar)."""

    def check_cancel(self) -> None:
        """Raise the host's cancel exception when the user has cancelled."""

    def is_cancel(self, error: BaseException) -> bool:
        """Whether ``error`` is the host's cancel exception."""

    def send(self, event: str, data: dict) -> None:
        """Tell the front end: ``event`` is "progress" (after each step) or "stopped" (the run ended early)."""


class SaveFailed(LoraLabError):
    """The finished LoRA could not be written; its message says where the weights went instead."""


class TrainingRun:
    """Progress, events, saves and the report of one training run."""

    def __init__(self, host: Host, output_name: str, unique_id, save_dtype: torch.dtype, optimizer_name: str):
        self.host, self.folders = host, host.save_folders
        self.output_name, self.unique_id, self.save_dtype = output_name, unique_id, save_dtype
        self.optimizer_name = optimizer_name
        self.losses: list[float] = []
        self.step = 0
        self.started_at = time.time()
        self.saves: list[str] = []
        self.periodic: list[saves.WrittenSave] = []   # this run's <name>_step<N> files, oldest first
        self.snapshot = None      # the loop's resumable state after the last finished step
        self.saved_step = 0
        self.cache_report = ""
        self.previews = None                  # the host's sample previews (due, render, rendered...), if asked for
        self.previews_said: list[str] = []    # their report lines, where they were rendered in another process
        self.identity: str | None = None      # run_reuse: written into the final save
        self.notes: list[str] = []            # settings that do nothing here, for the report
        self.carried_steps = 0                # losses of an interrupted run this one continues (not timed here)
        self.validation = ValidationHistory()   # the held-out pictures' loss at each epoch's end (validation.py)
        self.ema = None                       # the adapters' moving average (ema.py), when the run keeps one
        self.ema_beside = False               # True: the final save also writes <name>_ema; False: saves hold the EMA
        self.ema_path: str | None = None      # the <name>_ema file written beside the final save

    @contextlib.contextmanager
    def kept_if_stopped(self, lora, describe):
        """Around training: whatever stops it (Cancel, a NaN, the GPU's memory, any error) keeps what was
        trained as a save and says which one; the adapters leave the shared model in every case."""
        try:
            yield
        except SaveFailed:
            raise                       # the weights are already rescued and the message says where
        except NonFiniteLoss as bad:
            self.save_partial(lora, describe, "stopped: the loss was not a number")
            raise user_error(self.host.node_name, "learning_rate", f"{bad}. {self.last_save_text()}",
                             "lower the learning rate, use fp32 or bf16 precision, or check the dataset "
                             "for broken pictures.") from None
        except torch.cuda.OutOfMemoryError:
            self.save_partial(lora, describe, "stopped: the GPU ran out of memory")
            raise user_error(self.host.node_name, "batch_size", f"the GPU ran out of memory at step {self.step + 1}. "
                             f"{self.last_save_text()}", "turn on gradient_checkpointing in Training Options, "
                             "lower batch_size or resolution, use bf16 (or fp16) precision, or close other "
                             "models; then resume from the last save.") from None
        except BaseException as error:
            if self.host.is_cancel(error):
                self.save_partial(lora, describe, "cancelled")
            elif isinstance(error, Exception):
                self.save_partial(lora, describe, f"stopped by an error ({type(error).__name__})")
            raise
        finally:
            lora.remove()

    def validate_on(self, held_out: HeldOut, settings, resumed_save=None, measured_with: dict | None = None) -> None:
        """Record the validation loss of ``held_out``'s pictures (measured by the loop). A run resumed from
        ``resumed_save`` (a LoRA file) goes on with that save's history, if it measured the same pictures
        with the same draws and loss (an interrupted run's is carried on by continue_interrupted)."""
        key = history_key(held_out.pictures, settings.seed, settings.noise, settings.mixed_precision, measured_with)
        self.validation = ValidationHistory(key, len(held_out.indices))
        if resumed_save is not None and self.validation.on:
            self.validation = self.validation.continued_from(run_reuse.file_metadata(resumed_save))

    def step_callback(self, lora, describe, options):
        def on_step(report: StepReport):
            self.step = report.step
            self.snapshot = report.snapshot
            self.losses.append(report.loss)
            if report.validation_loss is not None:      # before any save at this step, which keeps it
                self.validation.add(report.epoch, report.validation_loss, report.step)
            self.host.progress(report.step, report.total)
            self.send_event(report)
            name = self.periodic_save_name(report, options, describe.epoch_plan)
            if name:
                try:
                    self.save(lora, describe, report.snapshot(), report.step, final=False, overwrite=True, name=name)
                except Exception as failed:     # a full disk must not end the run; the final save tries again
                    log.warning("[LoRA Lab] the save at step %d failed (%s: %s); training goes on",
                                report.step, type(failed).__name__, failed)
                else:
                    self.keep_last_periodic_saves(options.keep_last_saves)
            if self.previews and self.previews.due(report.step):
                self.render_preview(lora, report.step)
            self.host.check_cancel()     # Cancel: the host's own check, with or without a progress hook
        return on_step

    def periodic_save_name(self, report: StepReport, options, epoch_plan) -> str | None:
        """<name>_epoch<E> at the step that completes every save_every_n_epochs-th epoch, else
        <name>_step<N> every save_every_n_steps steps; None when neither is due (or the final save is next)."""
        if report.step >= report.total:
            return None
        every = options.save_every_n_epochs
        done, before = epoch_plan.completed_at(report.step), epoch_plan.completed_at(report.step - 1)
        if every and done // every > before // every:
            return f"{self.output_name}_epoch{done}"
        if options.save_every_n_steps and report.step % options.save_every_n_steps == 0:
            return f"{self.output_name}_step{report.step}"
        return None

    def send_event(self, report: StepReport):
        remaining = (report.total - report.step) * report.seconds
        event = {"node": self.unique_id, "step": report.step, "total": report.total, "loss": report.loss,
                 "lr": report.lr, "seconds_per_step": report.seconds, "eta_seconds": remaining}
        if report.validation_loss is not None:         # an epoch ended: [epoch, loss, step], as in chart()
            event["validation_loss"] = self.validation.chart_points()[-1]
        self.host.send("progress", event)

    def save(self, lora, describe, loop_state, step, final, overwrite, name=None):
        name = name or (self.output_name if final else f"{self.output_name}_step{step}")
        metadata = describe.metadata(step=step, started_at=self.started_at, finished_at=time.time())
        self.add_validation(metadata)
        if final:       # only a finished run can stand in for the same run queued again
            metadata[run_reuse.LOSS_HISTORY_KEY] = run_reuse.loss_history_text(self.losses)
            if self.identity:
                metadata[run_reuse.RUN_IDENTITY_KEY] = self.identity
        elif self.identity:     # the same run queued after a crash goes on from here (interrupted_runs.py)
            metadata[interrupted_runs.UNFINISHED_RUN_KEY] = self.identity
        path = save_lora_file(self.folders.loras, name, self.weights_to_save(lora, metadata), metadata,
                              overwrite=overwrite, dtype=self.save_dtype)
        if final and self.ema is not None and self.ema_beside:
            self.save_averaged_beside(lora, path, metadata, overwrite)
        try:
            state_path = saves.save_resume_state(path, lora, loop_state, step, self.optimizer_name, self.folders,
                                                 run={"run_identity": self.identity, "losses": list(self.losses)})
        except Exception as failed:     # the LoRA itself is written: only an exact resume is lost
            state_path = None
            log.warning("[LoRA Lab] %s is saved, but its resume state could not be written (%s: %s); it cannot "
                        "be continued exactly (resume_from lists only saves with a state)", path,
                        type(failed).__name__, failed)
        if not final:
            self.periodic.append(saves.WrittenSave.of(path, state_path))
        self.saves.append(str(path))
        self.saved_step = step
        log.info("[LoRA Lab] saved %s (step %d)", path, step)
        return path

    def weights_to_save(self, lora, metadata: dict) -> dict:
        """The LoRA's weights as this run saves them: the moving average instead of the raw weights when the run
        keeps one and ema_weights is "replace" (the resume state always holds the raw ones, to go on exactly)."""
        if self.ema is None:
            return lora.kohya_state_dict()
        metadata["loralab_ema_decay"] = str(self.ema.decay)
        if self.ema_beside:
            metadata["loralab_ema"] = "raw weights; the moving average is saved beside, as <name>_ema"
            return lora.kohya_state_dict()
        metadata["loralab_ema"] = "moving average of the weights (the resume state holds the raw ones)"
        with self.ema.applied():
            return lora.kohya_state_dict()

    def ema_text(self) -> str:
        if self.ema is None:
            return ""
        # The warm-up caps the decay at (1 + n) / (10 + n): say what it reached, not only what was asked.
        decay = f"decay {self.ema.decay}, reached {self.ema.current_decay():.4f} after {self.ema.updates} steps"
        if self.ema_beside:
            return (f"; the moving average of its weights ({decay}) as {Path(self.ema_path).name}" if self.ema_path
                    else "; the moving average could not be saved beside it (see the log)")
        return f" (the moving average of its weights, {decay})"

    def save_averaged_beside(self, lora, path, metadata: dict, overwrite: bool):
        """<name>_ema beside the final save ``path``: the moving average of the final weights, a LoRA like any
        other (no resume state). A failure here costs only this file: the LoRA itself is saved."""
        name = os.path.relpath(path, self.folders.loras)[: -len(".safetensors")] + "_ema"
        try:
            with self.ema.applied():
                averaged = lora.kohya_state_dict()
            self.ema_path = str(save_lora_file(
                self.folders.loras, name, averaged, {**metadata, "loralab_ema": "moving average of the weights",
                                                     "ss_output_name": f"{metadata.get('ss_output_name', name)}_ema"},
                overwrite=overwrite, dtype=self.save_dtype))
        except Exception as failed:
            log.warning("[LoRA Lab] the moving average could not be saved as %s (%s: %s)", name,
                        type(failed).__name__, failed)
            self.notes.append(f"the moving average could not be saved as {name} ({type(failed).__name__}: {failed})")
            return
        self.saves.append(self.ema_path)
        log.info("[LoRA Lab] saved the moving average as %s", self.ema_path)

    def continue_interrupted(self, base_name: str, describe):
        """When this very run (same identity) was interrupted before (ComfyUI killed or crashed): its newest
        whole save to go on from, and ``describe`` under that run's name -> (ResumePoint or None, describe).
        The run then saves under that name, counts its earlier saves for keep_last_saves and carries on
        its loss history; the notes say what happened."""
        if not self.identity:
            return None, describe
        found, skipped = interrupted_runs.find_interrupted(self.folders, base_name, self.identity)
        self.notes += skipped
        if found is None:
            if skipped:
                self.notes.append("no save of the interrupted run could be continued: training starts fresh")
            return None, describe
        self.output_name = found.base_name
        self.periodic = [saves.WrittenSave.of(lora, state) for lora, state in found.run_saves]
        # Stopped again before a step: that save still holds all that was trained, and messages name it.
        self.step = self.saved_step = found.point.step
        self.saves = [str(found.lora)]
        self.losses = [float(value) for value in found.point.run.get("losses", [])][: found.point.step]
        self.carried_steps = len(self.losses)
        self.validation = self.validation.continued_from(run_reuse.file_metadata(found.lora))
        self.notes.append(found.note())
        log.warning("[LoRA Lab] %s", found.note())
        return found.point, dataclasses.replace(describe, output_name=self.output_name)

    def keep_last_periodic_saves(self, keep: int):
        """keep_last_saves: delete this run's older step saves (and their resume state), newest K stay.

        Only files this run wrote and that are unchanged since are deleted; the final file and any
        other run's files are never candidates.
        """
        if keep <= 0:
            return
        while len(self.periodic) > keep:
            old = self.periodic.pop(0)
            if old.remove():
                log.info("[LoRA Lab] keep_last_saves=%d: deleted %s", keep, old.lora)
                if str(old.lora) in self.saves:
                    self.saves.remove(str(old.lora))

    def render_preview(self, lora, step):
        try:
            # The weights the saves hold: the moving average, when it replaces them.
            with self.ema.applied() if self.ema is not None and self.ema.saved_instead else contextlib.nullcontext():
                self.previews.render(lora, step)
        except Exception as failed:         # a preview must never cost the training run
            if self.host.is_cancel(failed):
                raise
            log.warning("[LoRA Lab] the preview at step %d failed (%s: %s); previews are off for the rest of "
                        "this run", step, type(failed).__name__, failed)
            self.previews.failed = f"{type(failed).__name__}: {failed}"

    def save_partial(self, lora, describe, why):
        if self.step == 0:
            log.warning("[LoRA Lab] training %s before the first step finished; nothing to save", why)
            return None
        if self.saves and self.saved_step == self.step:   # a periodic save already holds this very step
            log.warning("[LoRA Lab] training %s at step %d; what was trained is saved as %s", why, self.step,
                        self.saves[-1])
            return self.saves[-1]
        try:
            path = self.save(lora, describe, self.snapshot() if self.snapshot else None, self.step,
                             final=False, overwrite=False)
        except Exception as failed:
            path, _ = self.rescue(lora, describe, failed)
            if path is None:
                return None
        log.warning("[LoRA Lab] training %s at step %d; what was trained is saved as %s", why, self.step, path)
        self.host.send("stopped", {
            "node": self.unique_id, "step": self.step, "reason": why, "saved": str(path)})
        return path

    def save_final(self, lora, describe, loop_state, step, overwrite):
        try:
            return self.save(lora, describe, loop_state, step, final=True, overwrite=overwrite)
        except Exception as failed:
            target = os.path.join(self.folders.loras, self.output_name + ".safetensors")
            rescued, rescue_error = self.rescue(lora, describe, failed)
            problem = f"the trained LoRA could not be written to {target} ({type(failed).__name__}: {failed})."
            if rescued:
                raise SaveFailed(str(user_error(
                    self.host.node_name, "output_name",
                    f"{problem} The trained weights (step {step}) are safe in {rescued}.",
                    "free disk space or fix the loras folder's permissions, then move that file into "
                    "models/loras: it loads like any LoRA."))) from failed
            raise SaveFailed(str(user_error(
                self.host.node_name, "output_name", f"{problem} Saving a copy in {self.folders.rescue} failed too "
                f"({rescue_error}); the weights of this run could not be kept.",
                "free disk space or fix the permissions of models/loras and ComfyUI's user folder, then "
                "queue again."))) from failed

    def rescue(self, lora, describe, failed):
        """models/loras refused the file: write it under user/loralab/rescued instead -> (path, None) or
        (None, the rescue's own error)."""
        name = f"{self.output_name}_step{self.step}"
        log.error("[LoRA Lab] saving %s failed (%s: %s); writing it to %s", name, type(failed).__name__, failed,
                  self.folders.rescue)
        try:
            metadata = describe.metadata(step=self.step, started_at=self.started_at, finished_at=time.time())
            self.add_validation(metadata)
            path = save_lora_file(self.folders.rescue, name, self.weights_to_save(lora, metadata), metadata,
                                  overwrite=False, dtype=self.save_dtype)
        except Exception as also_failed:
            log.error("[LoRA Lab] the rescue copy failed too (%s: %s); the weights are lost",
                      type(also_failed).__name__, also_failed)
            return None, f"{type(also_failed).__name__}: {also_failed}"
        self.saves.append(str(path))
        self.saved_step = self.step
        log.warning("[LoRA Lab] the weights of step %d are safe in %s", self.step, path)
        return path, None

    def add_validation(self, metadata: dict) -> None:
        """Every save keeps the validation history so far: the epoch grid labels its rows with it, and a
        reused or resumed run shows it."""
        if self.validation.on:
            metadata[VALIDATION_KEY] = self.validation.metadata_text()

    def chart(self) -> dict:
        """Train LoRA's loss chart data: the newest losses, the steps they span and the validation losses
        ([[epoch, loss, step], ...]; a point sits at the step where its epoch ended)."""
        shown = self.losses[-CHART_LOSSES:]
        return {"loss": shown, "loss_steps": [self.step - len(shown) + 1, self.step],
                "validation_loss": self.validation.chart_points()}

    def loss_curve(self, title: str):
        """The loss_curve picture: every loss, and the validation losses on the same axes."""
        return loss_curve_image(self.losses, title=title, steps=(self.step - len(self.losses) + 1, self.step),
                                validation=self.validation.entries)

    def file_of_step(self, step: int, final_name: str) -> str | None:
        """Which file holds the LoRA of ``step`` (the report's best epoch); None for a step of the run this
        one was resumed from, whose files it does not know."""
        if step == self.step:
            return final_name
        for path in dict.fromkeys([*self.saves, *(str(save.lora) for save in self.periodic)]):
            if os.path.isfile(path) and run_reuse.file_metadata(path).get("ss_steps") == str(step):
                return os.path.basename(path)
        if step <= self.step - (len(self.losses) - self.carried_steps):
            return None
        return "not saved (set save_every_n_epochs on the Saves & Resume node to keep every epoch)"

    def last_save_text(self) -> str:
        return f"The last good save is {self.saves[-1]}." if self.saves else "Nothing was saved."

    def report(self, lora_name, describe) -> str:
        elapsed = time.time() - self.started_at
        finite = [v for v in self.losses if math.isfinite(v)]
        lines = [f"Saved {lora_name} in {self.folders.loras}" + self.ema_text(),
                 f"{len(self.losses) - self.carried_steps} steps in {elapsed:.0f}s; "
                 f"loss {finite[0]:.4f} -> {finite[-1]:.4f}"
                 if finite else "no steps", describe.arithmetic(), self.cache_report]
        lines += self.validation.report_lines(lambda step: self.file_of_step(step, lora_name))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines + (self.previews_report() if self.previews else self.previews_said))

    def previews_report(self) -> list[str]:
        steps = [step for step, _ in self.previews.rendered]
        lines = [f"previews: {len(self.previews.labels())} picture(s) at step(s) {', '.join(map(str, steps))}"
                 if steps else "previews: none (fewer steps than preview_every_n_steps)"]
        if self.previews.failed:
            lines.append(f"previews stopped: {self.previews.failed}")
        return lines
