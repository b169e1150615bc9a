"""The diffusion substrate both stages train on: datasets and splits (`data`), the VP/DDPM noise schedule,
loss and sampler (`diffusion`), and the denoisers (`denoisers`)."""
