"""Train LoRA on several GPUs or machines: the Distributed Training node, Train LoRA's controller side, and the
workers' side once ComfyUI runs in them (nodes/distributed_worker.py boots it).

The controller (Train LoRA in the server) prepares the run as always -- dataset encoded with its cache and
progress, settings, resume, the run's identity -- then writes a job folder: the API sub-graph that builds
MODEL, CLIP and VAE, the prepared run (trainer/distributed/plain.py: tensors and settings, never code) and the
model's fingerprint. It unloads its models and starts torchrun in a process group of its own. Each worker runs
ComfyUI headless, executes that sub-graph with ComfyUI's own executor -- so any loader or patch the user wired
gives the same model -- refuses a fingerprint that differs, and trains its share with DDP over the adapters
(trainer/distributed/data_parallel.py). Rank 0 alone writes saves, resume state and previews, and its events
(progress, previews, the end) come back through the job folder; the controller relays them to the front end,
passes Cancel on, and ends with the same outputs an in-process run gives.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from pathlib import Path

import torch

import comfy.model_management

from ..trainer.data.dataset import Dataset, DatasetItem
from ..trainer.data.encoded_dataset import EncodedDataset, Example, PictureSize, TextEncoding
from ..trainer.data.regularization import Regularization
from ..trainer.captions.augment import CaptionAugment
from ..trainer.distributed import plain
from ..trainer.file_hashes import FileHashes
from ..trainer.distributed.data_parallel import DataParallel, RunStopped
from ..trainer.distributed.job import JobFolder
from ..trainer.distributed.launcher import Launched, Topology, commands_for_other_machines, torchrun_command
from ..trainer.distributed.worker import WorkerProcess
from ..trainer.lora.network import Network
from ..trainer.messages import LoraLabError, user_error
from ..trainer.training.kohya_metadata import BaseModel, Description
from ..trainer.data.encoded_dataset import Epochs
from ..trainer.training.loop import LoopState, TrainSettings
from ..trainer.training.noise import NoiseSettings
from ..trainer.training.run import TrainingRun
from ..trainer.training.saves import ResumePoint, WrittenSave
from ..trainer.training.validation import HeldOut, ValidationHistory
from . import comfy_bridge, events, folders
from .training_options import TrainingOptions
from .training_previews import PreviewSettings

log = logging.getLogger("LoRA Lab")
NODE = "Train LoRA"
NODE_DISTRIBUTED = "Distributed Training"
DISTRIBUTED_TYPE = "LORALAB_DISTRIBUTED"
WORKER_SCRIPT = Path(__file__).resolve().parent / "distributed_worker.py"
PACK_ROOT = Path(__file__).resolve().parents[1]
# What a prepared run is made of: the only classes a job file can bring back (plain.py).
PREPARED_CLASSES = (HeldOut, EncodedDataset, Example, PictureSize, TextEncoding, TrainSettings, Network, NoiseSettings,
                    CaptionAugment, TrainingOptions, PreviewSettings, Description, BaseModel, Epochs, Dataset,
                    DatasetItem, Regularization, ResumePoint, LoopState, ValidationHistory, WrittenSave, FileHashes)
# The run's state the workers' rank 0 carries on from (TrainingRun's fields; an interrupted run's too).
RUN_FIELDS = ("output_name", "unique_id", "save_dtype", "optimizer_name", "identity", "notes", "validation",
              "cache_report", "periodic", "step", "saved_step", "saves", "losses", "carried_steps", "started_at")
WHERE = ("this machine", "several machines")


# --- the node ------------------------------------------------------------------------------------------
class LoraLabDistributedTraining:
    DESCRIPTION = ("Trains with several GPUs (and machines) at once: connect to Train LoRA's distributed input. The "
                   "same settings train the same LoRA; batch_size stays the whole batch, split across the GPUs.")
    CATEGORY = "LoRA Lab/Train"
    FUNCTION = "settings"
    RETURN_TYPES = (DISTRIBUTED_TYPE,)
    RETURN_NAMES = ("distributed",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "where": (list(WHERE), {"tooltip": "this machine: its GPUs. several machines: this one and others that "
                                    "each run the command Train LoRA's report shows when you queue (with the job "
                                    "folder at the same path there)."}),
            "gpus": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip":
                             "Training processes per machine, one per GPU (on a machine without a GPU: CPU "
                             "processes)."}),
            "machines": ("INT", {"default": 2, "min": 1, "max": 256, "tooltip": "Used with 'several machines'."}),
            "address": ("STRING", {"default": "", "tooltip": "With 'several machines': this machine's address as the "
                                   "others reach it. Keep the port private: torch.distributed does not authenticate."}),
            "port": ("INT", {"default": 29500, "min": 1024, "max": 65535}),
            "timeout_seconds": ("INT", {"default": 600, "min": 5, "max": 86400, "tooltip":
                                        "How long a GPU may wait for the others at a step before the run ends with a "
                                        "message naming the one that did not answer."}),
        }}

    def settings(self, where, gpus, machines, address, port, timeout_seconds):
        several = where == WHERE[1]
        if several and not address.strip():
            raise user_error(NODE_DISTRIBUTED, "address", "several machines need this machine's address.",
                             "type the address the other machines reach this one at (e.g. 10.0.0.5).")
        if torch.cuda.is_available() and gpus > torch.cuda.device_count():
            raise user_error(NODE_DISTRIBUTED, "gpus", f"{gpus} GPUs were asked for; this machine has "
                             f"{torch.cuda.device_count()}.", f"set gpus to {torch.cuda.device_count()} or fewer.")
        return (Topology(gpus=gpus, machines=machines if several else 1, machine=0,
                         address=address.strip() or "127.0.0.1", port=port, timeout=float(timeout_seconds)),)


# --- the controller -----------------------------------------------------------------------------------
def sub_graph(prompt: dict, node_id, inputs=("model", "clip", "vae")) -> tuple[dict, dict]:
    """The part of an API prompt that makes the values on ``node_id``'s ``inputs``: those nodes and everything
    upstream of them, ids kept -> (sub-prompt, {input: [node id, output slot]})."""
    node = prompt[str(node_id)]
    wanted = {name: node["inputs"][name] for name in inputs if isinstance(node["inputs"].get(name), list)}
    keep, todo = set(), [link[0] for link in wanted.values()]
    while todo:
        current = str(todo.pop())
        if current in keep:
            continue
        keep.add(current)
        links = [value for value in prompt[current]["inputs"].values() if isinstance(value, list) and len(value) == 2]
        todo += [link[0] for link in links]
    return {key: prompt[key] for key in keep}, {name: [str(link[0]), link[1]] for name, link in wanted.items()}


def comfyui_setup() -> dict:
    """What a worker needs to run this very ComfyUI: where its code is, its command-line settings, its folders."""
    import folder_paths
    from comfy.cli_args import args
    settings = {key: value for key, value in vars(args).items()
                if isinstance(value, (str, int, float, bool, type(None), list))}
    return {
        "sys_path": [entry for entry in sys.path if entry],
        "root": str(Path(folder_paths.__file__).resolve().parent),
        "args": settings,
        "folders": {name: [list(paths), sorted(extensions)]
                    for name, (paths, extensions) in folder_paths.folder_names_and_paths.items()},
        "directories": {"output": folder_paths.get_output_directory(), "temp": folder_paths.get_temp_directory(),
                        "input": folder_paths.get_input_directory(),
                        "user": getattr(folder_paths, "get_user_directory", lambda: None)()},
        "pack_root": str(PACK_ROOT),
    }


def train_elsewhere(topology: Topology, prompt: dict, unique_id, model, prepared: dict, relay: "Relay"):
    """Train the prepared run on ``topology``'s workers -> the final save's path, as train_adapters returns it.
    ``relay`` (made with the run and its host) takes the workers' progress, losses and saves into the run as they
    come, and the finished run's previews."""
    if not isinstance(prompt, dict) or str(unique_id) not in prompt:
        raise user_error(NODE, "distributed", "the queued graph is not available to send to the workers.",
                         "queue the workflow from ComfyUI's front end or its /prompt API.")
    job = write_job(topology, prompt, unique_id, model, prepared, relay.run)
    worker = [str(WORKER_SCRIPT), str(job.path)]
    status = starting_text(topology, worker, job)
    log.warning("[LoRA Lab] %s", status)
    comfy_bridge.send_to_front_end(events.TRAIN_STATUS, {"node": unique_id, "text": status})
    comfy.model_management.unload_all_models()       # the GPUs are the workers' now
    comfy.model_management.soft_empty_cache()
    threads = max(1, (os.cpu_count() or 1) // topology.gpus) if not torch.cuda.is_available() else 0
    launched = Launched(torchrun_command(topology, worker), job, threads_per_rank=threads)
    log.info("[LoRA Lab] distributed training on %d process(es); job folder %s", topology.world, job.path)
    try:
        outcome = launched.follow(relay, cancel_requested=comfy.model_management.processing_interrupted,
                                  cancel_grace=topology.timeout + 30)
        if outcome.ok and relay.finished:
            relay.take_over(job)
            return relay.finished["saved"]
    finally:
        # The prepared run holds the encoded dataset (gigabytes with Flux's T5 encodings): the saves hold what a
        # run goes on from, so only the job's log and events stay, to read what happened.
        for done_with in ("run.pt", "finished.pt"):
            (job.path / done_with).unlink(missing_ok=True)
    if outcome.cancelled:
        log.warning("[LoRA Lab] distributed training cancelled; %s", relay.stopped_text())
        raise comfy.model_management.InterruptProcessingException()
    for error in outcome.errors:             # a rank's own message for the user (a NaN, a different model)
        if error.get("kind") in ("LoraLabError", "SaveFailed"):
            raise LoraLabError(error["message"])
    failure = outcome.failure(topology.world, topology.timeout)
    raise user_error(NODE, "distributed", f"the distributed run stopped: {failure}. {relay.last_save_text()} "
                     f"torchrun's log: {job.log_path}.",
                     "see the log for the rank's own error; then queue again (resume_from the last save to go on).")


def starting_text(topology: Topology, worker: list[str], job: JobFolder) -> str:
    """What the node's report says until the first step: where the job is and, for several machines, the exact
    command each other machine runs (rank 0 waits for them at the rendezvous)."""
    lines = [f"Distributed training: {topology.gpus} process(es) on this machine, job folder {job.path}."]
    commands = commands_for_other_machines(topology, worker)
    if commands:
        lines.append(f"Waiting for {len(commands)} other machine(s). On each, with the same ComfyUI, custom nodes "
                     "and model files, and this job folder at the same path, run:")
        lines += [f"  machine {number}: {command}" for number, command in enumerate(commands, start=1)]
    return "\n".join(lines)


def write_job(topology: Topology, prompt: dict, unique_id, model, prepared: dict, run: TrainingRun) -> JobFolder:
    """The job folder (trainer/distributed/job.py): what builds the model, its fingerprint, the prepared run."""
    graph, wanted = sub_graph(prompt, unique_id)
    job = JobFolder(folders.user_folder("distributed") / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    job.write_job({"created": time.time(), "comfyui": comfyui_setup(), "graph": graph, "wanted": wanted,
                   "node": str(unique_id), "fingerprint": comfy_bridge.model_fingerprint(model),
                   "timeout": topology.timeout, "world": topology.world})
    plain.save({**prepared, "run": {name: getattr(run, name) for name in RUN_FIELDS}}, job.path / "run.pt")
    return job


class Relay:
    """The workers' events, passed on: progress to ComfyUI's bar and the loss chart, front-end events as they are."""

    def __init__(self, run: TrainingRun, host):
        self.run, self.host = run, host
        self.finished, self.stopped, self.saves = None, None, []
        self.previews = self.previews_shown = None

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "run":
            data = event["data"]
            if event["name"] == "progress":
                self.run.step = data["step"]
                self.run.losses.append(data["loss"])
                self.host.progress(data["step"], data["total"])
            self.host.send(event["name"], data)
        elif kind == "front_end":
            comfy_bridge.send_to_front_end(event["name"], event["data"])
        elif kind == "saved":
            self.saves.append(event["path"])
        elif kind == "finished":
            self.finished = event
        elif kind == "stopped":
            self.stopped = event

    def take_over(self, job: JobFolder) -> None:
        """The finished run's record (losses, saves, validation, notes) as the report and chart show it."""
        summary = plain.load(job.path / "finished.pt", PREPARED_CLASSES)
        for name, value in summary["run"].items():
            setattr(self.run, name, value)
        self.previews, self.previews_shown = summary.get("previews"), summary.get("previews_shown")

    def last_save_text(self) -> str:
        return f"The last good save is {self.saves[-1]}." if self.saves else "Nothing was saved."

    def stopped_text(self) -> str:
        saved = (self.stopped or {}).get("saved")
        return f"what was trained is saved as {saved}" if saved else "nothing was saved"


# --- the workers ---------------------------------------------------------------------------------------
class JobHost:
    """Rank 0's host: its progress and events go to the job folder, for the controller to relay."""

    def __init__(self, worker: WorkerProcess):
        self.worker = worker
        self.node_name = NODE
        self.save_folders = folders.save_folders()

    def progress(self, step: int, total: int) -> None:
        pass                        # the "progress" event carries it

    def check_cancel(self) -> None:
        pass                        # Cancel is decided by all ranks together at each step's exchange

    def is_cancel(self, error: BaseException) -> bool:
        return isinstance(error, RunStopped)

    def send(self, event: str, data: dict) -> None:
        self.worker.report("run", name=event, data=data)


class LeaderRun(TrainingRun):
    """Rank 0's run: saves as in-process, and says so, so a failure's message can name the last one."""

    def save(self, *args, **kwargs):
        path = super().save(*args, **kwargs)
        self.host.worker.report("saved", path=str(path))
        return path


class FollowerRun(TrainingRun):
    """The run as ranks 1.. see it: the same training, no saves, no previews, no events (rank 0 has them all)."""

    def step_callback(self, lora, describe, options):
        return lambda report: None

    def save_partial(self, lora, describe, why):
        return None

    def save_final(self, lora, describe, loop_state, step, overwrite):
        return None


def run_sub_graph(graph: dict, wanted: dict) -> dict:
    """MODEL, CLIP and VAE from the controller's sub-graph, with ComfyUI's own executor (no server)."""
    import execution

    class Quiet:            # what the executor needs of a server: nobody is listening here
        client_id = None
        last_node_id = None
        last_prompt_id = None

        def send_sync(self, *args, **kwargs):
            pass

    executor = execution.PromptExecutor(Quiet())
    executor.execute(graph, uuid.uuid4().hex, {}, sorted({link[0] for link in wanted.values()}))
    if not executor.success:
        failure = [data for event, data in executor.status_messages if event == "execution_error"]
        detail = failure[0].get("exception_message", "") if failure else "see the worker's log"
        raise user_error(NODE, "model", f"a worker could not build the model from the graph: {detail}",
                         "make sure the model files exist at the same paths on every machine.")
    outputs = getattr(executor, "outputs", None)
    made = {}
    for name, (node, slot) in wanted.items():
        output = outputs[node] if outputs is not None else executor.caches.outputs.get(node)
        made[name] = output[slot][0]
    return made


def worker_main(job_path: Path) -> None:
    """A rank's whole run (called by distributed_worker.py once ComfyUI is up)."""
    from .train import train_adapters        # train.py imports this module
    from .training_previews import TrainingPreviews
    job = JobFolder(job_path)
    spec = job.job()
    with WorkerProcess(job, spec["timeout"]) as worker:
        _relay_front_end_events(worker)
        built = run_sub_graph(spec["graph"], spec["wanted"])
        model, clip, vae = built.get("model"), built.get("clip"), built.get("vae")
        if comfy_bridge.model_fingerprint(model) != spec["fingerprint"]:
            raise user_error(NODE, "distributed", f"rank {worker.rank} built a different model than the one this "
                             "graph trained with (its weights or patches differ).",
                             "give every machine the same model files, custom nodes and ComfyUI version.")
        prepared = plain.load(job.path / "run.pt", PREPARED_CLASSES)
        settings, options, describe = prepared["settings"], prepared["options"], prepared["describe"]
        state = prepared["run"]
        kind = LeaderRun if worker.is_main else FollowerRun
        run = kind(JobHost(worker), state["output_name"], state["unique_id"], state["save_dtype"], state["optimizer_name"])
        for name, value in state.items():
            setattr(run, name, value)
        if worker.is_main and options.previews.every_n_steps:
            run.previews = TrainingPreviews(model, clip, options.previews, describe.trigger_word,
                                            (describe.resolution, describe.resolution), state["unique_id"],
                                            settings.mixed_precision)
        parallel = worker.parallel = DataParallel(worker.device(), worker.cancel_requested)
        try:
            saved = train_adapters(model, clip, prepared["split"], settings, options, worker.device(), run, describe,
                                   prepared["resume"], parallel=parallel)
        except RunStopped as stopped:
            worker.report("stopped", step=stopped.step, saved=run.saves[-1] if run.saves else None)
            return
        if worker.is_main:
            run.previews_said = run.previews_report() if run.previews else []
            plain.save({"run": {name: getattr(run, name)
                                for name in (*RUN_FIELDS, "ema_path", "ema_beside", "previews_said")},
                        "previews": run.previews.decoded(vae) if run.previews else None,
                        "previews_shown": run.previews.shown if run.previews else None}, job.path / "finished.pt")
        worker.report("finished", saved=str(saved))


def _relay_front_end_events(worker: WorkerProcess) -> None:
    """Whatever the nodes send the front end in a worker (previews) goes through the job folder instead (rank 0)."""
    from server import PromptServer
    instance = PromptServer.instance
    instance.send_sync = lambda event, data, sid=None: worker.report("front_end", name=event, data=data)


NODE_CLASS_MAPPINGS = {"LoraLabDistributedTraining": LoraLabDistributedTraining}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLabDistributedTraining": "Distributed Training (LoRA Lab)"}
