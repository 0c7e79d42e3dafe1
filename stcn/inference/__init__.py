"""The inference layer: the memory bank (`memory.py`) and the frame-by-frame propagation core
(`core.py`: InferenceCore, InferenceConfig, Annotation). It imports only `stcn.model`."""
