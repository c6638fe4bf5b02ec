"""Published architecture of TBAC-UniImage-3B's components, used when their folders are absent.

The official checkpoint's ``config.json`` names its components by hub id
(``Qwen/Qwen2.5-VL-3B-Instruct``, ``Efficient-Large-Model/Sana_1600M_512px_diffusers``). We never
download: when no local folder for an id is found, these built-in configs describe the modules so
the weights of ``model.safetensors`` can be loaded into them. Only configs live here, no weights.
"""
from __future__ import annotations

QWEN25_VL_3B_ID = "Qwen/Qwen2.5-VL-3B-Instruct"
SANA_1600M_512_ID = "Efficient-Large-Model/Sana_1600M_512px_diffusers"

QWEN25_VL_3B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "in_channels": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
        "model_type": "qwen2_5_vl",
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# Qwen2-VL image processor settings of Qwen2.5-VL-3B-Instruct (preprocessor_config.json).
QWEN25_VL_IMAGE_PROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "merge_size": 2,
    "patch_size": 14,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "temporal_patch_size": 2,
}

SANA_1600M_512_TRANSFORMER_CONFIG = {
    "_class_name": "SanaTransformer2DModel",
    "attention_bias": False,
    "attention_head_dim": 32,
    "caption_channels": 2304,
    "cross_attention_dim": 2240,
    "cross_attention_head_dim": 112,
    "dropout": 0.0,
    "in_channels": 32,
    "interpolation_scale": None,
    "mlp_ratio": 2.5,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "num_attention_heads": 70,
    "num_cross_attention_heads": 20,
    "num_layers": 20,
    "out_channels": 32,
    "patch_size": 1,
    "sample_size": 16,
}

# DC-AE f32c32 (SANA 1.0), as in Sana_1600M_512px_diffusers/vae/config.json.
DCAE_F32C32_CONFIG = {
    "_class_name": "AutoencoderDC",
    "attention_head_dim": 32,
    "decoder_act_fns": "silu",
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock",
                            "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "decoder_norm_types": "rms_norm",
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "downsample_block_type": "Conv",
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock",
                            "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "in_channels": 3,
    "latent_channels": 32,
    "scaling_factor": 0.41407,
    "upsample_block_type": "interpolate",
}

# SANA's flow DPM-Solver++ (diffusers' conversion of the SANA 512px scheduler).
SANA_FLOW_DPM_SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}

BUILTIN_MLLM = {QWEN25_VL_3B_ID: QWEN25_VL_3B_CONFIG}
BUILTIN_DIFFUSION = {
    SANA_1600M_512_ID: {
        "transformer": SANA_1600M_512_TRANSFORMER_CONFIG,
        "vae": DCAE_F32C32_CONFIG,
        "scheduler": SANA_FLOW_DPM_SCHEDULER_CONFIG,
    }
}
