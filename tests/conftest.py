import os

# Keep the suite CPU-only and reproducible on the 2-core CI machine.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "2")
