"""ccaserve's inference core: model families (LlamaGen's GPT and VQ), checkpoint loading, the one
table of modes, KV-cached generation, the pipeline, image helpers and the model registry.
It imports nothing from the packages above it (server, ui, training, evaluation, benchmarks, cli).

    import samplers
    gpt = samplers.load_gpt("c2i_B_256.pt")            # or samplers.build_gpt("GPT-B")
    tokens = samplers.generate(gpt, [207], cfg_scale=4.0, top_k=2000, seeds=[0])
    vq = samplers.load_vq("vq_ds16_c2i.pt")
    images = vq.decode_code(tokens, (16, 16))          # [1, 3, 256, 256] in [-1, 1]
"""

from .checkpoint import CheckpointError, convert, load_gpt, load_vq, read_checkpoint, save_pretrained
from .family import LlamaGenFamily, ModelFamily, StepDecoder, family_for
from .generate import Decoder, ImageJob, generate
from .gpt import GPT, GPT_PRESETS, GPTConfig, build_gpt
from .modes import MODES, Mode, SamplingOptions, get_mode, normalize_mode
from .pipeline import ImageResult, Pipeline
from .registry import Registry
from .vq import VQ_PRESETS, VQConfig, VQModel, build_vq

__all__ = [
    "GPT", "GPTConfig", "GPT_PRESETS", "build_gpt", "load_gpt",
    "VQModel", "VQConfig", "VQ_PRESETS", "build_vq", "load_vq",
    "generate", "Decoder", "ImageJob", "SamplingOptions",
    "Pipeline", "ImageResult", "MODES", "Mode", "get_mode", "normalize_mode", "Registry",
    "ModelFamily", "LlamaGenFamily", "StepDecoder", "family_for",
    "CheckpointError", "read_checkpoint", "save_pretrained", "convert",
]
