"""ccaserve's inference core: model families (LlamaGen's GPT and VQ; VAR and its multi-scale VQVAE),
checkpoint loading, the one
table of modes, KV-cached generation, the pipeline, image helpers and the model registry.
It imports nothing from the packages above it (server, ui, training, evaluation, benchmarks, cli).

    import samplers
    gpt = samplers.load_gpt("c2i_B_256.pt")            # or samplers.build_gpt("GPT-B")
    tokens = samplers.generate(gpt, [207], cfg_scale=4.0, top_k=2000, seeds=[0])
    vq = samplers.load_vq("vq_ds16_c2i.pt")
    images = vq.decode_code(tokens, (16, 16))          # [1, 3, 256, 256] in [-1, 1]

    vae = samplers.load_var_vae("vae_ch160v4096z32.pth")
    var = samplers.load_var("var_d16.pth", vae)         # depth from the shapes; holds its VAE
    tokens = samplers.generate(var, [207], cfg_scale=2.5, top_k=900, top_p=0.96, seeds=[0])  # VAR's cfg=1.5
    images = vae.decode_code(tokens)                   # [1, 3, 256, 256] in [-1, 1]
"""

from .checkpoint import (
    CheckpointError,
    convert,
    load_gpt,
    load_var,
    load_var_vae,
    load_vq,
    read_checkpoint,
    save_pretrained,
)
from .family import LlamaGenFamily, ModelFamily, StepDecoder, VARFamily, decoder_for, family_for, generate
from .generate import Decoder, ImageJob
from .gpt import GPT, GPT_PRESETS, GPTConfig, build_gpt
from .modes import MODES, Mode, SamplingOptions, get_mode, normalize_mode
from .pipeline import ImageResult, Pipeline
from .registry import Registry
from .var import VAR, VARConfig, VARDecoder, build_var
from .var_vae import VARVAE, VARVAEConfig, build_var_vae
from .vq import VQ_PRESETS, VQConfig, VQModel, build_vq

__all__ = [
    "GPT", "GPTConfig", "GPT_PRESETS", "build_gpt", "load_gpt",
    "VQModel", "VQConfig", "VQ_PRESETS", "build_vq", "load_vq",
    "generate", "Decoder", "ImageJob", "SamplingOptions",
    "Pipeline", "ImageResult", "MODES", "Mode", "get_mode", "normalize_mode", "Registry",
    "ModelFamily", "LlamaGenFamily", "VARFamily", "StepDecoder", "family_for", "decoder_for",
    "VAR", "VARConfig", "VARDecoder", "build_var", "load_var", "VARVAE", "VARVAEConfig", "build_var_vae",
    "load_var_vae",
    "CheckpointError", "read_checkpoint", "save_pretrained", "convert",
]
