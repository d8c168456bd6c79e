"""Hot kernels (OpenAI Triton) beside their torch references; configs.py holds their tunables."""
