# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10 · LoRA in twenty lines
#
# LoRA (Hu et al. 2021, arXiv 2106.09685) is how Stable Diffusion is customised today: thousands of
# adapters for SD 1.5, and the few-step accelerators (LCM-LoRA, TCD, Hyper-SD) ship only as LoRAs. The whole
# idea is one equation (eq. 3 of the paper): keep a pretrained weight W0 frozen and learn a low-rank change,
#
#     h = W0 x + (alpha / r) * B A x,      A: (r x d_in), B: (d_out x r), r << d_in, d_out
#
# This tutorial writes that out, trains it, and checks every claim:
#
# 1. the update by hand equals minidiff's `LoraLayer` (and costs r (d_in + d_out) numbers, not d_in d_out);
# 2. rank against fit: a rank-r LoRA can at best reach the best rank-r approximation of the change it
#    must learn (Eckart-Young), and training gets there;
# 3. training a LoRA on the tiny SD UNet: only A and B move, and A does not move at the first step;
# 4. fused (W0 + (alpha/r) B A in one matrix) equals unfused to rounding, and unfusing gives W0 back;
# 5. what alpha does, and the alpha / scale confusion.
#
# **Run it:** `python tutorials/10_lora.py` (seconds, no weights), or open it as a notebook. Pictures go to
# `tutorials/out/10_lora/`.

# %%
import torch

import tutorial_helpers as helpers
from minidiff import StableDiffusionPipeline
from minidiff.models.lora import LoraConfig, LoraLayer
from minidiff.models.lora_adapters import add_lora_layer, get_peft_model_state_dict
from minidiff.viz.plotting import loglog_plot

torch.set_num_threads(1)  # small tensors: more threads only add overhead on a shared CPU
torch.manual_seed(0)
OUT = helpers.output_folder("10_lora")

# %% [markdown]
# ## 1. The low-rank update, written out
#
# A 64 -> 48 linear layer and a rank-4 adapter. `LoraLayer` wraps the layer: the original `nn.Linear` becomes
# its `base_layer`, untouched, and the adapter adds two small matrices A and B. We give B random values
# (trained adapters have them; a fresh one starts at B = 0, so it changes nothing).

# %%
d_in, d_out, r, alpha = 64, 48, 4, 8.0
layer = LoraLayer(torch.nn.Linear(d_in, d_out))
layer.update_layer("mine", r=r, lora_alpha=alpha, init_lora_weights=False)  # False: A and B both random
layer.active_adapters = ["mine"]
W0, b0 = layer.base_layer.weight, layer.base_layer.bias
A, B = layer.lora_A["mine"].weight, layer.lora_B["mine"].weight
x = torch.randn(5, d_in)

by_hand = x @ W0.T + b0 + (alpha / r) * (x @ A.T @ B.T)  # h = W0 x + (alpha / r) B A x
with torch.no_grad():
    helpers.describe("A", A)
    helpers.describe("B", B)
    print("max |layer(x) - by hand| =", (layer(x) - by_hand).abs().max().item())
    assert torch.allclose(layer(x), by_hand, atol=1e-5)
print(f"numbers: full matrix {d_in * d_out}, LoRA {r * (d_in + d_out)} ({r * (d_in + d_out) / (d_in * d_out):.0%})")
assert r * (d_in + d_out) < d_in * d_out / 4

# %% [markdown]
# In SD 1.5's UNet the attention matrices are 320 to 1280 wide: a rank-4 adapter on a 1280 x 1280 `to_q` has
# 10 240 numbers instead of 1 638 400 (0.6%). That is why LoRA files are a few MB while the UNet is 3.4 GB.
#
# ## 2. Rank against fit
#
# Suppose the change the data needs is a matrix Delta of rank 6. A rank-r LoRA can only ever make B A of rank
# at most r, so its best possible error is the best rank-r approximation's, which the singular values of Delta
# give (Eckart-Young): || Delta - best_r ||_F = sqrt(sigma_{r+1}^2 + sigma_{r+2}^2 + ...). We train LoRAs of
# rank 1 to 8 on regression data y = (W0 + Delta) x with Adam and compare with that floor.

# %%
generator = torch.Generator().manual_seed(1)
base = torch.nn.Linear(d_in, d_out)
delta = torch.randn(d_out, 6, generator=generator) @ torch.randn(6, d_in, generator=generator) / 8  # rank 6
inputs = torch.randn(2048, d_in, generator=generator)
targets = base(inputs).detach() + inputs @ delta.T
singular_values = torch.linalg.svdvals(delta)


def train_rank(rank: int, steps: int = 600) -> float:
    """Fit a rank-`rank` LoRA on the frozen `base`; returns || (alpha/r) B A - Delta ||_F."""
    wrapped = LoraLayer(torch.nn.Linear(d_in, d_out))
    wrapped.base_layer.load_state_dict(base.state_dict())
    wrapped.base_layer.requires_grad_(False)
    wrapped.update_layer("fit", r=rank, lora_alpha=rank, init_lora_weights=True)  # A random, B = 0
    wrapped.active_adapters = ["fit"]
    optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(wrapped(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (wrapped.delta_weight("fit").detach() - delta).norm().item()


ranks = [1, 2, 4, 6, 8]
fits = {rank: train_rank(rank) for rank in ranks}
floors = {rank: singular_values[rank:].norm().item() for rank in ranks}
for rank in ranks:
    print(f"rank {rank}: || B A - Delta || = {fits[rank]:.4f}   best possible (Eckart-Young) {floors[rank]:.4f}")
    assert fits[rank] >= floors[rank] - 1e-4  # no rank-r adapter beats the floor
    assert fits[rank] <= floors[rank] + 0.05 * singular_values.norm().item()  # and training reaches it
assert fits[6] < 0.02 * singular_values.norm().item()  # rank >= the change's rank: the change is learned
loglog_plot({"trained LoRA": (ranks, [fits[k] for k in ranks]),
             "Eckart-Young floor": (ranks[:-2], [floors[k] for k in ranks[:-2]])},
            OUT / "rank_vs_fit.png", title="rank-r LoRA against a rank-6 change", x_label="rank r",
            y_label="|| B A - Delta ||_F", dashed=("Eckart-Young floor",), guide_orders=())

# %% [markdown]
# ## 3. Training a LoRA on the UNet: only A and B move
#
# The API of diffusers' `train_text_to_image_lora.py`: `unet.add_adapter(LoraConfig(...))` with peft's field
# names (peft's own `LoraConfig` is accepted too). It wraps every `to_q`, `to_k`, `to_v`, `to_out.0` and
# leaves only A and B trainable. With `init_lora_weights="gaussian"`, A ~ N(0, 1/r^2) and B = 0: the model
# starts exactly as it was, and since dL/dA = (alpha/r) B^T (dL/dh) x^T, **A's gradient is exactly zero at the
# first step** (AdamW's weight decay still shrinks A a little; its gradient is what we check). We train a few steps of the usual noise-prediction loss on a fixed batch, on tiny random weights.

# %%
pipe = StableDiffusionPipeline.from_pretrained(helpers.tiny_sd15_folder())
unet = pipe.unet
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                            target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
frozen_before = {name: t.clone() for name, t in unet.state_dict().items() if "lora_" not in name}
lora_before = {name: t.detach().clone() for name, t in get_peft_model_state_dict(unet).items()}
trainable = [p for p in unet.parameters() if p.requires_grad]
print(f"trainable: {sum(p.numel() for p in trainable)} of {sum(p.numel() for p in unet.parameters())} numbers")

batch = torch.Generator().manual_seed(2)
latents, text = torch.randn(4, 4, 8, 8, generator=batch), torch.randn(4, 77, 32, generator=batch)
noise, timesteps = torch.randn(4, 4, 8, 8, generator=batch), torch.randint(0, 1000, (4,), generator=batch)
noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
optimizer = torch.optim.AdamW(trainable, lr=1e-2)
losses = []
lora_parameters = get_peft_model_state_dict(unet)  # the live parameters, by name
for step in range(15):
    loss = torch.nn.functional.mse_loss(unet(noisy, timesteps, text).sample, noise)
    optimizer.zero_grad()
    loss.backward()
    if step == 0:  # B = 0, so dL/dA = 0 exactly; B's gradient is not
        assert all(p.grad.abs().max() == 0 for k, p in lora_parameters.items() if "lora_A" in k)
        assert all(p.grad.abs().max() > 0 for k, p in lora_parameters.items() if "lora_B" in k)
    optimizer.step()
    losses.append(loss.item())
print("loss:", " ".join(f"{loss:.3f}" for loss in losses))
assert losses[-1] < losses[0]
assert all(torch.equal(t, frozen_before[name]) for name, t in unet.state_dict().items() if "lora_" not in name)
moved = get_peft_model_state_dict(unet)
assert all(not torch.equal(moved[k], lora_before[k]) for k in moved)  # A moves from the second step on
print("every base weight is bit for bit the same; every A and B moved")

# %% [markdown]
# ## 4. Fused equals unfused, to rounding
#
# At inference the adapter need not cost anything: `fuse_lora` writes W0 + (alpha/r) B A into the base
# weight once (for a k x k convolution, delta_W[o, i] = sum_r B[o, r] A[r, i], a k x k kernel too), and the
# layer stops adding B A x. `unfuse_lora` subtracts the same product again: W0 comes back up to float
# rounding. `unload_lora_weights` removes the layers and puts the original modules back (with their weights
# bit for bit when nothing was fused; after a fuse/unfuse round trip, up to that rounding).

# %%
with torch.no_grad():
    unfused = unet(noisy, timesteps, text).sample
    unet.fuse_lora()
    fused = unet(noisy, timesteps, text).sample
    unet.unfuse_lora()
difference = (fused - unfused).abs().max().item()
print(f"max |fused - unfused| = {difference:.2e}")
assert difference < 1e-4
drift = max((t - frozen_before[name]).abs().max().item() for name, t in unet.state_dict().items() if "lora_" not in name)
print(f"after unfuse, max |W - W0| = {drift:.1e}")
assert drift < 1e-6
unet.unfuse_lora()  # nothing fused any more: no change
unet.unload_lora()
original_names = {name.replace(".base_layer", ""): t for name, t in frozen_before.items()}
assert set(unet.state_dict()) == set(original_names)  # the original modules, under their own names

# %% [markdown]
# ## 5. What alpha does, and the alpha / scale confusion
#
# The update is multiplied by alpha / r, so alpha alone means nothing: alpha = 8 at rank 4 doubles B A,
# alpha = 1 at rank 128 divides it by 128. The paper sets alpha once so that changing r does not force a new
# learning rate. kohya's files store alpha per layer (`.alpha`), PEFT files in the safetensors header
# (`lora_adapter_metadata`), and without either alpha = r (a factor 1).
#
# The *scale* users set is another multiplier on top: `cross_attention_kwargs={"scale": s}` (one call),
# `pipe.set_adapters(name, s)` (A1111's `<lora:name:s>`) and `fuse_lora(lora_scale=s)` all multiply the same
# update by s. Two consequences, checked below on one layer: (i) alpha = r/2 at scale 1 is the same LoRA as
# alpha = r at scale 0.5; (ii) a file whose alpha is dropped (a converter that ignores `.alpha`) comes out
# r / alpha times too strong.

# %%
x = torch.randn(3, d_in)
with torch.no_grad():
    half_alpha = LoraLayer(torch.nn.Linear(d_in, d_out))
    half_alpha.update_layer("a", r=4, lora_alpha=2.0, init_lora_weights=False)
    half_alpha.active_adapters = ["a"]
    full_alpha = LoraLayer(half_alpha.base_layer)
    full_alpha.update_layer("a", r=4, lora_alpha=4.0, init_lora_weights=False)
    full_alpha.lora_A["a"].weight.copy_(half_alpha.lora_A["a"].weight)
    full_alpha.lora_B["a"].weight.copy_(half_alpha.lora_B["a"].weight)
    full_alpha.set_scale("a", 0.5)  # set_adapters("a", 0.5)
    full_alpha.active_adapters = ["a"]
    assert torch.allclose(half_alpha(x), full_alpha(x), atol=1e-6)
    base_out = half_alpha.base_layer(x)
    dropped = LoraLayer(half_alpha.base_layer)
    dropped.update_layer("a", r=4, lora_alpha=4.0, init_lora_weights=False)  # alpha lost: alpha = r
    dropped.lora_A["a"].weight.copy_(half_alpha.lora_A["a"].weight)
    dropped.lora_B["a"].weight.copy_(half_alpha.lora_B["a"].weight)
    dropped.active_adapters = ["a"]
    ratio = ((dropped(x) - base_out).norm() / (half_alpha(x) - base_out).norm()).item()
print(f"alpha=2, scale=1 equals alpha=4, scale=0.5; with alpha dropped the update is {ratio:.2f}x too strong")
assert abs(ratio - 2.0) < 1e-4

# %% [markdown]
# On a pipeline, the same multipliers reach the text encoder's LoRA too: `pipe(prompt,
# cross_attention_kwargs={"scale": 0.5})` halves both. What to remember: **alpha is part of the file, scale is
# yours**; both multiply B A, so a "too strong" LoRA is fixed with a scale below 1, never by editing alpha.
# `docs/lora.md` shows the three file formats side by side.
