import os

# Nothing in the tests may reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

# Tiny models on a 2-core machine: one thread avoids the inter-op contention that makes them
# ~100× slower, and keeps the numbers independent of the machine's core count.
torch.set_num_threads(1)
