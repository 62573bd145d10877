"""ccaserve's sampling core: LlamaGen-compatible models, checkpoint loading and KV-cached
generation in four modes (free, cfg, cca, cca+cfg).

    import samplers
    gpt = samplers.load_gpt("c2i_B_256.pt")            # or samplers.build_gpt("GPT-B")
    tokens = samplers.generate(gpt, [207], cfg_scale=4.0, top_k=2000, seeds=[0])
    vq = samplers.load_vq("vq_ds16_c2i.pt")
    images = vq.decode_code(tokens, (16, 16))          # [1, 3, 256, 256] in [-1, 1]
"""

from .checkpoint import CheckpointError, convert, load_gpt, load_vq, read_checkpoint, save_pretrained
from .generate import Decoder, ImageJob, SamplingOptions, generate
from .gpt import GPT, GPT_PRESETS, GPTConfig, build_gpt
from .pipeline import MODES, ImageResult, Pipeline, normalize_mode
from .registry import Registry
from .vq import VQ_PRESETS, VQConfig, VQModel, build_vq

__all__ = [
    "GPT", "GPTConfig", "GPT_PRESETS", "build_gpt", "load_gpt",
    "VQModel", "VQConfig", "VQ_PRESETS", "build_vq", "load_vq",
    "generate", "Decoder", "ImageJob", "SamplingOptions",
    "Pipeline", "ImageResult", "MODES", "normalize_mode", "Registry",
    "CheckpointError", "read_checkpoint", "save_pretrained", "convert",
]
