"""Diffusion models: factory, loss and step (pure core), sampler, export, Ray Train stage.

Pure modules (no Ray): `models` (UNet2DModel / DDPMScheduler from config), `core`
(timesteps, SNR, per-sample `denoising_loss`, `train_step`, FLOPs), `stream` (seeded,
resumable class-weighted index stream), `state` (safetensors + JSON training state),
`sampling` (`generate`), `export` (diffusers layout), `rows` (the Ray Data transform to
training rows, numpy only). Ray shells: `train` (stage `train`),
`latents` (stage `latents`), `sample` (`dedt-ray sample`). Nothing is imported here, so
`dedt-ray --help` stays fast.
"""
