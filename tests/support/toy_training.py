"""Tiny stand-ins for training tests on plain torch: an eps-prediction denoiser, a toy encoded dataset and SD's
noise schedule. Shared by the loop's, the noise options' and the loss shapes' tests."""
import torch

from lora_lab.trainer.data.encoded_dataset import EncodedDataset, Example


class TinyEpsDenoiser(torch.nn.Module):
    """x0 = x - sigma * eps(x, cond): the same algebra as an eps model in ComfyUI."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(4 + 4, 16, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(16, 4, 3, padding=1))
        self.sigmas = torch.linspace(0.03, 14.6, 1000)

    def training_sigmas(self, u):
        return self.sigmas[(u * 1000).long().clamp(0, 999)]

    def noisy_latents(self, latents, noise, sigma):
        return latents + noise * sigma.view(-1, 1, 1, 1)

    def denoise(self, noisy, sigma, cond):
        c_in = 1 / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
        cond_map = cond.mean(dim=1)[:, :4].view(-1, 4, 1, 1).expand_as(noisy)
        eps = self.net(torch.cat([noisy * c_in, cond_map], dim=1))
        return noisy - eps * sigma.view(-1, 1, 1, 1)

    def output_error_scale(self, sigma):
        return sigma


def toy_data(n=6, size=8, seed=0, buckets=((64, 64),)) -> EncodedDataset:
    g = torch.Generator().manual_seed(seed)
    examples, conds = [], {}
    for i in range(n):
        caption = f"sks, picture {i % 3}"
        bucket = buckets[i % len(buckets)]
        latent = torch.randn(4, bucket[1] // 8, bucket[0] // 8, generator=g) * 0.5 + (i % 3) * 0.3
        examples.append(Example(latent=latent, caption=caption, bucket=bucket, repeats=2))
        conds.setdefault(caption, torch.randn(1, 7, 16, generator=g))
    return EncodedDataset(examples=examples, conds=conds, buckets={})


def params_of(model):
    return [p for p in model.parameters()]


def sd_schedule():
    """SD1.x/SDXL scaled-linear betas -> alphas_cumprod and ComfyUI's sigmas (ModelSamplingDiscrete)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return alphas_cumprod, sigmas


def interrupted_at(step: int, run) -> tuple:
    """(the loop's snapshot, the model's weights) when ``run(model, on_step)`` stops right after ``step`` on a fresh
    TinyEpsDenoiser (seed 0), as a Cancel or a killed ComfyUI would stop it: for resume tests."""
    captured = {}

    def stop(report):
        if report.step == step:
            captured["state"] = report.snapshot()
            captured["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
            raise KeyboardInterrupt

    torch.manual_seed(0)
    model = TinyEpsDenoiser()
    try:
        run(model, stop)
    except KeyboardInterrupt:
        return captured["state"], captured["weights"]
    raise AssertionError(f"the run ended before step {step}")

