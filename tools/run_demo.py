"""The main job on embedded defaults: a real ComfyUI with LoRA Lab, a demo dataset, caption -> train -> sample.

    bash tools/demo.sh            # sets up .venv, then runs this
    .venv/bin/python tools/run_demo.py [--port 8188] [--steps 30] [--exit]

Everything lives under <repo>/.demo/ (a private ComfyUI root: models/, input/, output/). Without real
weights it uses a RANDOM-WEIGHT SD1.5-architecture checkpoint and a random tiny BLIP: the pipeline is
real, the pictures are noise. Put a real checkpoint in .demo/comfyui/models/checkpoints/ (or run the
pack inside your own ComfyUI) and the same graph makes real pictures.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # the test harness
import comfyui_home  # noqa: E402
import demo_data  # noqa: E402
import random_models  # noqa: E402
from comfyui_server import ComfyServer  # noqa: E402

DEMO = comfyui_home.REPO / ".demo"
DATASET = "loralab_demo"
BLIP_NAME = "random-demo-blip"


def say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


def prepare(overlay: Path, checkpoint_name: str | None) -> str:
    comfyui_home.build_overlay(overlay)
    if checkpoint_name:
        if not (overlay / "models" / "checkpoints" / checkpoint_name).exists():
            sys.exit(f"--checkpoint {checkpoint_name}: put the file in {overlay / 'models' / 'checkpoints'} first")
        checkpoint = checkpoint_name
    else:
        say("building the random-weight SD1.5 checkpoint (first run only, ~1 min, 2.1 GB in "
            f"{comfyui_home.cache_dir()}) — its pictures are NOISE; use a real checkpoint for real pictures")
        try:
            built = random_models.full_sd15_checkpoint_built_aside()
        except RuntimeError as failed:
            sys.exit(f"could not build the demo checkpoint: {failed}")
        checkpoint = random_models.link_checkpoint(built, overlay)
    blip = overlay / "models" / "blip" / BLIP_NAME
    if not blip.exists():
        say(f"writing a tiny RANDOM BLIP to {blip} (its captions are random words; "
            "LoRA Lab downloads the real BLIP to models/blip/blip-base when you have internet)")
        random_models.tiny_blip(blip)
    dataset = overlay / "input" / DATASET
    if not dataset.exists():
        demo_data.write_demo_dataset(dataset, count=8, repeats=10, size=128)
        for caption in sorted(dataset.rglob("*.txt"))[::2]:   # leave half uncaptioned for BLIP to fill
            caption.unlink()
    say(f"demo dataset: {dataset} (8 generated pictures, half captioned, kohya folder 10_demo)")
    return checkpoint


def demo_prompt(checkpoint: str, steps: int, lora_name: str) -> dict:
    trigger = demo_data.TRIGGER
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "data": {"class_type": "LoraLabDatasetFromFolder", "inputs": {
            "folder": DATASET, "caption_extension": ".txt", "default_repeats": 1, "batch_size": 2,
            "target_steps": steps}},
        "blip": {"class_type": "LoraLabBlipLoader", "inputs": {"model": BLIP_NAME, "device": "auto",
                                                               "precision": "auto"}},
        "caption": {"class_type": "LoraLabCaption", "inputs": {
            "dataset": ["data", 0], "blip": ["blip", 0], "mode": "fill-missing", "trigger_word": trigger,
            "prompt": "", "min_length": 3, "max_length": 12, "num_beams": 1, "batch_size": 4, "find": "",
            "replace": "", "remove_tags": "", "write_sidecars": False}},
        "train": {"class_type": "LoraLabTrainLora", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "dataset": ["caption", 0],
            "output_name": lora_name, "resolution": 128, "steps": steps, "epochs": 0, "batch_size": 2,
            "learning_rate": 1e-4, "rank": 8, "alpha": 4.0, "seed": 0, "trigger_word": trigger}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": f"{trigger}, a red circle", "clip": ["train", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["train", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["train", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 42, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "loralab_demo"}},
        "loss": {"class_type": "SaveImage", "inputs": {"images": ["train", 3], "filename_prefix": "loralab_demo_loss"}},
    }


def print_event(event: dict) -> None:
    kind, data = event.get("type"), event.get("data") or {}
    if kind == "loralab.train.progress":
        say(f"train step {data['step']}/{data['total']}  loss {data['loss']:.4f}  "
            f"{data['seconds_per_step']:.2f} s/step  ETA {data['eta_seconds']:.0f}s")
    elif kind == "executing" and data.get("node"):
        say(f"running node '{data['node']}'")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpoint", help="a checkpoint file name already in .demo/comfyui/models/checkpoints")
    parser.add_argument("--exit", action="store_true", help="stop the server when the run is done")
    args = parser.parse_args(argv)
    started = time.monotonic()
    root = comfyui_home.find_comfyui_root()
    say(f"ComfyUI: {comfyui_home.comfyui_version_label(root)} at {root}")
    overlay = DEMO / "comfyui"
    checkpoint = prepare(overlay, args.checkpoint)

    say(f"starting ComfyUI on http://127.0.0.1:{args.port} (log: {overlay / 'server.log'})")
    server = ComfyServer(overlay, port=args.port, log_path=overlay / "server.log").start()
    try:
        info = server.get_json("/object_info")
        ours = sorted(name for name, spec in info.items() if spec.get("category", "").startswith("LoRA Lab"))
        say(f"LoRA Lab nodes loaded: {', '.join(ours)}")
        lora_name = f"loralab_demo_{time.strftime('%Y%m%d_%H%M%S')}"
        say(f"queueing dataset -> BLIP caption -> Train LoRA ({args.steps} steps, 128 px) -> KSampler -> SaveImage")
        history = server.run(demo_prompt(checkpoint, args.steps, lora_name), timeout=6 * 3600, on_event=print_event)
        outputs = history["outputs"]
        lora = overlay / "models" / "loras" / f"{lora_name}.safetensors"
        say(f"LoRA saved: {lora} ({lora.stat().st_size / 1e6:.1f} MB)")
        for node in ("save", "loss"):
            for image in outputs.get(node, {}).get("images", []):
                say(f"image: {overlay / 'output' / image['subfolder'] / image['filename']}")
        for text in outputs.get("train", {}).get("text", []):
            say("train report: " + text.replace("\n", " | "))
        say(f"done in {time.monotonic() - started:.0f}s. Reminder: random weights -> the picture is noise.")
        if args.exit:
            return 0
        say(f"ComfyUI keeps running at http://127.0.0.1:{args.port} — open it in a browser; Ctrl-C stops it.")
        while server.process.poll() is None:
            time.sleep(1)
        return server.process.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
