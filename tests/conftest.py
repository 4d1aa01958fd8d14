import os

# Nothing in the tests may reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

# Tiny models on a 2-core machine: one thread avoids the inter-op contention that makes them
# ~100× slower, and keeps the numbers independent of the machine's core count.
torch.set_num_threads(1)

import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

COLORS = ["red", "blue", "green"]


@pytest.fixture(scope="session")
def tiny_sd():
    from dmdcli.models.tiny import tiny_pipeline_cached

    return tiny_pipeline_cached("sd")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from dmdcli.models.tiny import tiny_pipeline_cached

    return tiny_pipeline_cached("sdxl")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square on white\n\na green triangle\n")
    return path


@pytest.fixture
def image_folder(tmp_path):
    """Eight captioned 40×40 images: a coloured disc on white, caption beside each."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        color = COLORS[i % 3]
        image = Image.new("RGB", (40, 40), "white")
        ImageDraw.Draw(image).ellipse([8, 8, 32, 32], fill=color)
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {color} circle")
    return folder


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process (a CLI run is one process); tests
    that change it reset it before and after, as accelerate's own tests do."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture(scope="session")
def tiny_sd3():
    from dmdcli.models.tiny import tiny_pipeline_cached

    return tiny_pipeline_cached("sd3")


@pytest.fixture(scope="session")
def tiny_flux():
    from dmdcli.models.tiny import tiny_pipeline_cached

    return tiny_pipeline_cached("flux")


@pytest.fixture(scope="session")
def tiny_chroma():
    from dmdcli.models.tiny import tiny_pipeline_cached

    return tiny_pipeline_cached("chroma")


@pytest.fixture(scope="session")
def tiny_flux2():
    from dmdcli.models.tiny import tiny_pipeline_cached

    return tiny_pipeline_cached("flux2")


@pytest.fixture(scope="session")
def tiny_flux2_dev():
    from dmdcli.models.tiny import tiny_pipeline_cached

    return tiny_pipeline_cached("flux2-dev")


@pytest.fixture(scope="session")
def tiny_z_image():
    from dmdcli.models.tiny import tiny_pipeline_cached

    return tiny_pipeline_cached("z-image")


@pytest.fixture(scope="session")
def tiny_qwen_image():
    from dmdcli.models.tiny import tiny_pipeline_cached

    return tiny_pipeline_cached("qwen-image")
