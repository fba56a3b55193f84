"""The fields of the training config: one dataclass per section, each field with its help, range and choices
(``opt``), which the app builds its widgets from. Reading, writing and validating them is ``core.config``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.data.dataset import CAPTION_EXTENSION

CONFIG_VERSION = 1


def opt(default, help: str, *, min=None, max=None, group: str = "advanced", multiple_of=None, **extra):
    """A dataclass field with UI/validation metadata.

    ``min``/``max`` bound numbers (inclusive), ``multiple_of`` constrains ints;
    choices come from the field's ``Literal`` type. ``group`` is "basic" or
    "advanced" (where the app shows it).
    """
    meta = {"help": help, "min": min, "max": max, "group": group, "multiple_of": multiple_of, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


PredictionType = Literal["auto", "epsilon", "v_prediction"]
ModelFamily = Literal["auto", "sd1", "sd2", "sdxl", "sd3", "flux", "flux2", "zimage"]
Quantize = Literal["none", "int8", "nf4", "fp8"]
Optimizer = Literal["adamw8bit", "adamw", "prodigy", "adafactor", "lion8bit", "paged_adamw8bit", "schedulefree_adamw"]
MixedPrecision = Literal["no", "fp16", "bf16"]
LrScheduler = Literal["constant", "cosine", "linear", "cosine_with_restarts", "polynomial", "warmup_stable_decay"]
TimestepSampling = Literal["auto", "uniform", "logit_normal", "sigmoid", "mode"]
LossType = Literal["l2", "huber", "smooth_l1"]
HuberSchedule = Literal["snr", "exponential", "constant"]
FlowWeighting = Literal["none", "sigma_sqrt", "cosmap"]
Sampler = Literal["default", "ddim", "euler", "euler_a", "dpmpp_2m"]
SavePrecision = Literal["fp16", "bf16", "fp32"]
LoraType = Literal["lora", "locon", "loha", "lokr"]


@dataclass
class ModelConfig:
    path: str = opt("", "Base model: a single-file checkpoint (.safetensors/.ckpt, converted once), a local "
                    "diffusers folder (with model_index.json) or a Hugging Face hub id such as "
                    "'stable-diffusion-v1-5/stable-diffusion-v1-5'.", group="basic")
    revision: str = opt("", "Hub revision (branch, tag or commit) when path is a hub id; empty for the default.")
    family: ModelFamily = opt("auto", "Model family: 'auto' detects SD 1.x, SD 2.x, SDXL, SD 3.5 (sd3), FLUX.1 "
                              "(flux), FLUX.2 [klein] (flux2) or Z-Image (zimage) from the model's files; set it "
                              "only if detection is wrong.")
    prediction_type: PredictionType = opt(
        "auto", "What the model predicts. 'auto' reads it from the model's scheduler config; override only "
        "for models whose config is wrong (v-prediction fine-tunes shipped with an epsilon config).")
    clip_skip: int = opt(1, "SD 1.x/2.x: condition on the CLIP layer this many from the end (2 = the penultimate, "
                         "what anime fine-tunes expect), through CLIP's final norm as A1111 and sd-scripts do; 1 "
                         "is the last layer. SDXL always uses the penultimate layer and the flow families their "
                         "own: it applies to them as 1.", min=1, max=12)
    quantize: Quantize = opt("none", "Store the frozen UNet or transformer smaller while the LoRA trains in fp32 on "
                             "top (QLoRA): 'int8' and 'nf4' quantise its linear layers with bitsandbytes (half and "
                             "a quarter of bf16's memory, at some speed); 'fp8' stores its linear and convolution "
                             "weights in 8-bit floats, cast up per layer. SD 3.5 and FLUX store their T5 text "
                             "encoder the same way while it encodes the captions. The saved LoRA is the same file "
                             "either way and loads on the full model.")
    group_offload: bool = opt(False, "Keep the frozen UNet's (or transformer's) linear layers (most of its "
                              "weights) in system RAM "
                              "and bring each to the GPU only while it runs (diffusers' group offloading): the "
                              "last resort for a model that does not fit even quantised; steps get slower. "
                              "Needs train.gradient_checkpointing and model.quantize = 'none'.")


@dataclass
class DatasetConfig:
    path: str = opt("", "Folder of training images; each caption is a same-name .txt file beside its image. "
                    "Its dataset.toml (written by the Dataset tab) can exclude images and give subfolders "
                    "their own repeats.", group="basic")
    resolution: int = opt(512, "Training resolution in pixels: buckets have about this many pixels squared "
                          "(without buckets, images are cropped to this square). 512 for SD 1.x.",
                          min=64, max=4096, multiple_of=8, group="basic")
    validation_split: float = opt(0.1, "Fraction of images held out for validation loss (at least one when the "
                                  "dataset has 2 or more images; 0 turns validation off). Near-duplicates are "
                                  "kept on one side.", min=0.0, max=0.9)
    validation_path: str = opt("", "A folder of held-out images for the validation loss, instead of "
                               "validation_split. A subfolder of the dataset is left out of training; "
                               "training images that nearly duplicate one of them are dropped.")
    regularization_path: str = opt("", "A folder of class pictures (prior preservation, as in DreamBooth: photos of "
                                   "dogs in general for one particular dog), with their own captions; mixed into "
                                   "the batches, their loss weighted by train.prior_loss_weight. Empty: none. "
                                   "python -m core class-pictures draws such a folder with the base model.")
    regularization_ratio: float = opt(1.0, "Class-picture draws per training draw each epoch (each class picture "
                                      "is repeated the whole number of times closest to it; at least once).",
                                      min=0.01, max=100.0)
    repeats: int = opt(1, "How many times each image is seen per epoch (multiplied by the folder's repeats "
                       "from dataset.toml).", min=1, max=10000, group="basic")
    buckets: bool = opt(True, "Aspect-ratio buckets: train each image near its own shape (sizes in steps of "
                        "bucket_step with about resolution² pixels) instead of a center-cropped square.",
                        group="basic")
    bucket_step: int = opt(64, "Bucket sides are multiples of this many pixels.", min=8, max=512, multiple_of=8)
    bucket_min_side: int = opt(0, "Shortest bucket side; 0: half the resolution.", min=0, max=8192,
                               multiple_of=8)
    bucket_max_side: int = opt(0, "Longest bucket side; 0: twice the resolution.", min=0, max=8192,
                               multiple_of=8)
    no_upscale: bool = opt(False, "Never enlarge an image smaller than its bucket: it trains at its own size "
                           "(rounded down to bucket_step) instead. Needs buckets.")
    random_flip: bool = opt(False, "Mirror images left-right at random (a second latent per image is cached). "
                            "Off for subjects that are not symmetric (text, logos, a side parting).")
    random_crop: bool = opt(False, "Crop each draw at a random place of the resized picture instead of its centre "
                            "(the whole picture fits the bucket on one side; the crop moves along the other). "
                            "Needs dataset.cache_latents = false: a cached latent is one fixed crop.")
    color_jitter: float = opt(0.0, "Change brightness, contrast and saturation of each draw by a random factor "
                              "within 1 +/- this (0.1 is mild); 0 is off. Needs dataset.cache_latents = false.",
                              min=0.0, max=0.5)
    hue_jitter: float = opt(0.0, "Turn the hue of each draw by up to this share of the colour circle either way "
                            "(0.02 is mild; colour is often what a LoRA should learn, so keep it small); 0 is off. "
                            "Needs dataset.cache_latents = false.", min=0.0, max=0.5)
    shuffle_captions: bool = opt(False, "Shuffle the comma-separated tags of each caption every time it is "
                                 "drawn (for tag captions; turns off text-embedding caching).")
    keep_tokens: int = opt(0, "With shuffle_captions or tag_dropout: how many leading tags stay in place and "
                           "are never dropped (e.g. 1 keeps the trigger word first).", min=0, max=255)
    masked_loss: bool = opt(False, "Weight the loss by a mask per picture: its NAME.mask.png beside it (white "
                            "trains, black does not, grey in between), else its transparency (a cut-out subject "
                            "trains without its background, which is filled white). Pictures with neither train "
                            "everywhere. The health report lists which have one and how much they mask.")
    max_token_length: int = opt(75, "SD 1.x/2.x/SDXL: caption tokens that count. 75 is CLIP's window (longer "
                                "captions are cut); 150 or 225 encode longer captions in two or three windows, as "
                                "A1111 and sd-scripts do. The health report flags captions longer than this. The "
                                "flow families read long captions with their own text encoders.",
                                min=75, max=225, multiple_of=75)
    tag_dropout: float = opt(0.0, "Probability of leaving out each comma-separated tag of a caption every time it "
                             "is drawn (the first dataset.keep_tokens tags always stay; turns off text-embedding "
                             "caching); 0.1 is usual for tag captions.", min=0.0, max=1.0)
    caption_dropout: float = opt(0.0, "Probability of training an image with an empty caption (helps the "
                                 "LoRA work without its trigger; 0.05-0.1 is usual).", min=0.0, max=1.0)
    caption_extension: str = opt(CAPTION_EXTENSION, "Extension of caption files beside the images (the "
                                 "Dataset tab and the captioners write .txt).")
    cache_latents: bool = opt(True, "Encode each image with the VAE once and reuse the latents (much faster, "
                              "less VRAM). Off: every draw goes through the VAE, which random_crop, color_jitter "
                              "and hue_jitter need.")
    cache_while_training: bool = opt(True, "With cache_latents: encode each picture the first time a step "
                                     "draws it, so training starts at once (the VAE stays on the card until "
                                     "every latent is cached, about one epoch). Off: encode them all before the "
                                     "first step (a little less GPU memory during the first epoch).")
    cache_dir: str = opt("", "Where latent and text-embedding caches live. Empty: OUTPUT_DIR/.cache.")


@dataclass
class LoraConfig:
    rank: int = opt(16, "LoRA rank (network dim): capacity of the adapter. 4-32 for a character or style.",
                    min=1, max=1024, group="basic")
    alpha: float = opt(16.0, "LoRA alpha: the update is scaled by alpha/rank. alpha = rank is neutral; "
                       "alpha = rank/2 halves the effective learning rate.", min=1e-6, max=100000.0, group="basic")
    dropout: float = opt(0.0, "Dropout on the LoRA path during training.", min=0.0, max=0.9)
    type: LoraType = opt("lora", "Adapter kind. lora: low-rank update of the attention (and, for the flow "
                         "families, MLP) layers. locon: lora plus the convolution layers of the ResNet blocks and "
                         "down/upsamplers (SD 1.x/2.x/SDXL; lora.conv_rank, lora.conv_alpha). loha: a Hadamard "
                         "product of two low-rank pairs (more expressive at the same rank, twice the weights; "
                         "rank 4-16, alpha 1-4 typical). lokr: a Kronecker product (small files; lora.lokr_factor). "
                         "loha and lokr are written in the LyCORIS layout (hada_*, lokr_* keys) that A1111, Forge "
                         "and ComfyUI load natively.")
    dora: bool = opt(False, "DoRA (weight-decomposed LoRA): also train a magnitude per input column of each "
                     "layer; often closer to full fine-tuning at the same rank, each step somewhat slower. For "
                     "lora and locon; the file's dora_scale keys are what A1111, Forge and ComfyUI read.")
    conv_rank: int = opt(0, "Rank of the convolution layers (ResNet blocks, down/upsamplers) of the SD 1.x/2.x/SDXL "
                         "UNet; 0: they are not trained. lora.type = locon needs it above 0 (4-16 typical); loha "
                         "and lokr train them too when it is above 0.", min=0, max=1024)
    conv_alpha: float = opt(1.0, "Alpha of the convolution layers: their update is scaled by conv_alpha/conv_rank.",
                            min=1e-6, max=100000.0)
    lokr_factor: int = opt(-1, "lokr: the Kronecker factor; each layer's shape is split into a factor this size and "
                           "the rest (-1: as close to a square root as the shape allows; 4-16 gives smaller files).",
                           min=-1, max=1024)
    target_modules: list[str] = opt([], "Modules of the UNet or transformer that get LoRA (names or name suffixes; "
                                    "'*' stands for a block number). Empty: the family's default set: every "
                                    "attention projection for SD 1.x/2.x/SDXL (to_q, to_k, to_v, to_out.0), both "
                                    "attention streams for SD 3.5, and every linear layer of the double and "
                                    "single blocks but the modulations for FLUX (as sd-scripts trains them).")
    blocks: list[str] = opt([], "Train only these blocks (empty: all): SD 1.x/2.x/SDXL IN00-IN11, MID, OUT00-OUT11 "
                            "(A1111's LoRA Block Weight names; SDXL's attention is in IN04-IN08, MID, OUT00-OUT05); "
                            "FLUX double.N and single.N, SD 3.5 joint.N, Z-Image layer.N. Ranges (IN04-IN08, "
                            "single.0-19) and * (double.*) work.")
    block_ranks: list[str] = opt([], "Rank per block, as BLOCKS=RANK (e.g. OUT00-OUT02=8); alpha scales with it so "
                                 "alpha/rank stays lora.alpha/lora.rank. Others keep lora.rank.")
    block_lr_weights: list[str] = opt([], "Learning-rate weight per block, as BLOCKS=WEIGHT (e.g. MID=0.5, "
                                      "single.*=2); 0 leaves a block untrained. Others: 1.")
    train_text_encoder: bool = opt(False, "Also train a LoRA on the text encoder (stronger concept binding, "
                                   "more VRAM; disables text-embedding caching).")
    text_encoder_target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "out_proj"],
                                                 "Text encoder modules that get LoRA.")
    text_encoder_learning_rate: float = opt(0.0, "Learning rate for the text encoder LoRA; 0 uses "
                                            "train.learning_rate.", min=0.0, max=1.0)


@dataclass
class TrainStepsConfig:
    max_train_steps: int = opt(1000, "Number of optimizer steps.", min=1, max=10_000_000, group="basic")
    max_train_epochs: int = opt(0, "If above 0, train this many epochs instead of max_train_steps "
                                "(steps = ceil(images x repeats / (batch x accumulation)) x epochs).",
                                min=0, max=100000, group="basic")
    batch_size: int = opt(1, "Images per step on each GPU.", min=1, max=1024, group="basic")
    gradient_accumulation_steps: int = opt(1, "Accumulate gradients over this many batches per step "
                                           "(a larger effective batch without more VRAM).", min=1, max=1024)
    learning_rate: float = opt(1e-4, "Learning rate of the LoRA weights.", min=0.0, max=1.0, group="basic")
    lr_scheduler: LrScheduler = opt("constant", "Learning-rate schedule after warmup: constant, linear or cosine decay "
                                    "to 0, cosine_with_restarts (train.lr_scheduler_num_cycles), polynomial "
                                    "(train.lr_scheduler_power), or warmup_stable_decay (constant, then a linear decay "
                                    "over the last train.lr_decay_fraction of the run). Ignored by prodigy's and "
                                    "schedulefree_adamw's own step sizes.")
    lr_scheduler_num_cycles: int = opt(1, "cosine_with_restarts: how many cosine cycles (hard restarts) the run "
                                       "has.", min=1, max=1000)
    lr_scheduler_power: float = opt(1.0, "polynomial: the decay's power (1.0 is linear).", min=0.0, max=10.0)
    lr_decay_fraction: float = opt(0.2, "warmup_stable_decay: the share of the run, at its end, over which the "
                                   "learning rate decays to 0.", min=0.0, max=1.0)
    lr_warmup_steps: int = opt(0, "Steps of linear warmup from 0 to the learning rate.", min=0, max=10_000_000)
    optimizer: Optimizer = opt("adamw8bit", "adamw8bit (bitsandbytes, about 4x less optimizer memory), adamw (torch), "
                               "paged_adamw8bit (8-bit state that can spill to system RAM), lion8bit (one 8-bit "
                               "momentum; use a 3-10x smaller learning rate), prodigy (sets its own step size: "
                               "learning rate 1.0, no warmup schedule needed; see train.prodigy_*), adafactor "
                               "(factored moments, the least memory; train.adafactor_relative_step), or "
                               "schedulefree_adamw (no schedule: validation, samples and saved files use its "
                               "averaged weights; lr_warmup_steps is its own warmup).")
    prodigy_d_coef: float = opt(1.0, "prodigy: multiplies the step size it estimates (below 1 for gentler steps).",
                                min=0.01, max=100.0)
    prodigy_safeguard_warmup: bool = opt(True, "prodigy: keep the step-size estimate from growing during warmup "
                                         "(its authors' advice for diffusion models).")
    adafactor_relative_step: bool = opt(False, "adafactor: its own step size, growing from a small start "
                                        "(learning_rate and the schedule are then not used).")
    loraplus_lr_ratio: float = opt(0.0, "LoRA+: the B (up) matrices learn this many times faster than the A "
                                   "matrices (16 in the LoRA+ paper); 0 is off.", min=0.0, max=1000.0)
    prior_loss_weight: float = opt(1.0, "Weight of the class pictures' loss (dataset.regularization_path) "
                                   "against the training pictures'.", min=0.0, max=100.0)
    ema: bool = opt(False, "Also keep an exponential moving average of the LoRA weights (in system RAM): it is "
                    "validated and sampled beside the live weights and saved as its own file "
                    "(NAME-ema.safetensors, NAME-ema-stepN.safetensors). Smoother, often better at the end of "
                    "a run with a high learning rate.")
    ema_decay: float = opt(0.999, "EMA: how much of the average each update keeps (0.999 averages about the last "
                           "1000 updates); the first updates keep less, as diffusers' EMAModel warms up.",
                           min=0.5, max=0.99999)
    ema_update_every: int = opt(1, "EMA: average the weights in every N optimizer steps (each update copies the "
                                "LoRA weights to system RAM).", min=1, max=10000)
    adam_beta1: float = opt(0.9, "Adam beta1.", min=0.0, max=0.9999)
    adam_beta2: float = opt(0.999, "Adam beta2.", min=0.0, max=0.99999)
    adam_epsilon: float = opt(1e-8, "Adam epsilon.", min=0.0, max=1.0)
    weight_decay: float = opt(1e-2, "AdamW weight decay.", min=0.0, max=10.0)
    max_grad_norm: float = opt(1.0, "Clip gradients to this norm; 0 turns clipping off.", min=0.0, max=1e6)
    mixed_precision: MixedPrecision = opt("no", "Compute precision: bf16 (recent NVIDIA GPUs, CPUs), fp16 "
                                          "(older NVIDIA GPUs) or no (fp32). LoRA weights stay fp32.")
    gradient_checkpointing: bool = opt(True, "Recompute activations in the backward pass: much less VRAM, "
                                       "about 20-30% slower. On by default (what most GPUs need); 'Fit my GPU' "
                                       "turns it off where the card has room.")
    seed: int = opt(0, "Seed for the split, the data order and the noise.", min=0, max=2**32 - 1)
    noise_offset: float = opt(0.0, "Noise offset (0.05-0.1 helps very dark/bright images); 0 is off.",
                              min=0.0, max=1.0)
    min_snr_gamma: float = opt(0.0, "Min-SNR-gamma loss weighting (5 is the usual value); 0 is off. SD "
                               "1.x/2.x/SDXL only.", min=0.0, max=100.0)
    zero_terminal_snr: bool = opt(False, "SD 1.x/2.x/SDXL v-prediction models: rescale the noise schedule so its "
                                  "last step is pure noise (zero terminal SNR), so the model learns really dark "
                                  "and bright pictures; the samples then use trailing timesteps. For models trained "
                                  "that way (NoobAI-V-Pred, SD 2.1-v fine-tunes); a model whose scheduler already "
                                  "says rescale_betas_zero_snr has it without this.")
    min_timestep: int = opt(0, "Lowest noise level drawn while training, of 1000 (for the flow families the same "
                            "share of sigma): raise it to train less on the finest detail.", min=0, max=999)
    max_timestep: int = opt(1000, "Highest noise level drawn, of 1000: lower it to train less on composition.",
                            min=1, max=1000)
    loss_type: LossType = opt("l2", "l2 (mean squared error), or huber / smooth_l1 (pseudo-Huber: quadratic near "
                              "zero, linear beyond train.huber_c, so a few wrong pixels pull less).")
    huber_schedule: HuberSchedule = opt("snr", "huber / smooth_l1: how c follows the noise level: 'snr' (near 1 "
                                        "for clean inputs, huber_c for pure noise), 'exponential' (from 1 at t = 0 "
                                        "to huber_c at t = 1000) or 'constant' (huber_c).")
    huber_c: float = opt(0.1, "huber / smooth_l1: the c of the schedule (where the loss turns linear).",
                         min=1e-4, max=10.0)
    debiased_estimation: bool = opt(False, "Weight each example by 1/sqrt(SNR) (debiased estimation): less weight "
                                    "on the nearly clean noise levels.")
    multires_noise_iterations: int = opt(0, "Pyramid noise: octaves of lower-resolution noise added to the noise "
                                         "(6-10 is usual; helps very light or dark pictures); 0 is off.",
                                         min=0, max=20)
    multires_noise_discount: float = opt(0.3, "Pyramid noise: the weight of each coarser octave (0.1-0.4).",
                                         min=0.0, max=1.0)
    ip_noise_gamma: float = opt(0.0, "Input perturbation: extra noise on the model's input only (0.1 is usual); "
                                "0 is off.", min=0.0, max=1.0)
    timestep_sampling: TimestepSampling = opt(
        "auto", "How training draws noise levels. 'uniform': every level alike; 'logit_normal': mostly the middle "
        "levels (Stable Diffusion 3's recipe; train.logit_mean/logit_std); 'sigmoid': sd-scripts' name for "
        "logit_normal around the middle; 'mode': a mode-centred density (train.mode_scale). 'auto': uniform for "
        "SD 1.x/2.x/SDXL, logit_normal for SD 3.5 and Z-Image, sigmoid for FLUX.1 and FLUX.2. Flow models then "
        "apply the shift (train.flow_shift).")
    logit_mean: float = opt(0.0, "Mean of the logit_normal timestep sampling.", min=-10.0, max=10.0)
    logit_std: float = opt(1.0, "Standard deviation of the logit_normal and sigmoid timestep sampling.",
                           min=0.01, max=10.0)
    mode_scale: float = opt(1.29, "Scale of the 'mode' timestep sampling.", min=0.0, max=2.0)
    flow_shift: float = opt(0.0, "Flow models: shift of the sampled noise levels towards noise (sigma' = "
                            "shift*sigma / (1 + (shift-1)*sigma)); larger for larger pictures. 0: the model's own "
                            "(SD 3.5 and Z-Image-Turbo: 3.0 from the scheduler; FLUX.1: from the picture size, 1.9 "
                            "at 512 px and 3.2 at 1024 px, as its scheduler's dynamic shift; FLUX.2 [klein]: its "
                            "pipeline's empirical shift at 50 steps, 5.5 at 512 px and 7.6 at 1024 px).",
                            min=0.0, max=100.0)
    loss_weighting: FlowWeighting = opt("none", "Flow models: weight of each noise level in the loss ('sigma_sqrt' "
                                        "or 'cosmap' from the SD3 paper); 'none' is what the peers use.")
    guidance_scale: float = opt(1.0, "FLUX.1-dev: the guidance value fed to its guidance embedding while training "
                                "(1.0 as sd-scripts and ai-toolkit train; the samples use sample.guidance_scale).",
                                min=0.0, max=100.0)


@dataclass
class SampleConfig:
    prompts: list[str] = opt([], "Prompts for sample images during training (one image per prompt).",
                             group="basic")
    negative_prompt: str = opt("", "Negative prompt for the sample images.")
    every_n_steps: int = opt(200, "Validation loss and samples every N steps (and always at the end); "
                             "0: only at the end.", min=0, max=10_000_000, group="basic")
    at_start: bool = opt(True, "Also validate and sample before the first step (the base model's baseline).")
    steps: int = opt(20, "Denoising steps per sample image.", min=1, max=1000)
    guidance_scale: float = opt(7.5, "Classifier-free guidance scale of the samples.", min=0.0, max=50.0)
    seed: int = opt(0, "Seed of the sample images (the same at every step, so they are comparable).",
                    min=0, max=2**32 - 1)
    sampler: Sampler = opt("default", "Sampler of the sample images; 'default' uses the model's own (the only "
                           "choice for SD 3.5 and FLUX, which sample with their flow-matching scheduler).")
    width: int = opt(0, "Sample width; 0 uses dataset.resolution.", min=0, max=4096, multiple_of=8)
    height: int = opt(0, "Sample height; 0 uses dataset.resolution.", min=0, max=4096, multiple_of=8)
    validation_timesteps: int = opt(4, "Number of fixed timesteps (evenly spread) at which the validation "
                                    "loss is measured on each held-out image.", min=1, max=100)


@dataclass
class OutputConfig:
    dir: str = opt("outputs", "Folder that holds the runs.", group="basic")
    name: str = opt("my-lora", "Run name: the run folder and the LoRA file are named after it.", group="basic")
    trigger_phrase: str = opt("", "The word(s) that call up the LoRA (e.g. 'sks dog'); recorded in the file "
                              "(modelspec.trigger_phrase) so A1111/ComfyUI users see it.")
    save_every_n_steps: int = opt(500, "Save an intermediate LoRA (and the resume state) every N steps; "
                                  "0: only at the end.", min=0, max=10_000_000)
    save_precision: SavePrecision = opt("fp16", "Precision of the saved LoRA weights (fp16 is what A1111 "
                                        "and ComfyUI users expect; fp32 doubles the file).")
    save_diffusers_format: bool = opt(False, "Also write the final LoRA in the diffusers/peft layout "
                                      "(NAME-diffusers/pytorch_lora_weights.safetensors), for diffusers scripts.")
    tensorboard: bool = opt(False, "Also log the losses, learning rate, validation loss and sample images for "
                            "TensorBoard (accelerate's tracker; needs pip install tensorboard) in the run's "
                            "tensorboard folder; the command to open it is printed. The app's own plots stay.")
    save_state: bool = opt(True, "Save optimizer and data-order state with each checkpoint so "
                           "a stopped or interrupted run can be resumed.")
    save_every_n_epochs: int = opt(0, "Also save an intermediate LoRA (and the resume state) at the end of every N "
                                   "epochs; 0: off.", min=0, max=100000)
    keep_last_n: int = opt(0, "Keep only the newest N intermediate LoRA files (the one with the best validation "
                           "loss is always kept too; an old file goes only once the new one is complete); 0 "
                           "keeps them all.", min=0, max=100000)
    keep_states: int = opt(1, "How many resume states to keep (oldest are removed).", min=1, max=1000)
    overwrite: bool = opt(False, "Replace an earlier run of the same name instead of refusing to start.")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainStepsConfig = field(default_factory=TrainStepsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    config_version: int = CONFIG_VERSION

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.output.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
