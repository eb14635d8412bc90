"""Split pyproject.toml's dependencies into the pip requirement files docker/deploy.Dockerfile installs.

torch.txt holds PyTorch's pins (installed first, from the build's TORCH_INDEX_URL: CUDA or CPU
builds), app.txt all of them, with flwr's extras dropped: Flower's base image already has flwr (without
the simulation extra, which a deployment does not use) and the build fails here if its version is not
the one pyproject.toml pins. Run in the build: python requirements.py DIR
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

TORCH = {"torch", "torchvision"}


def name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def main(directory: Path) -> None:
    dependencies = tomllib.loads((directory / "pyproject.toml").read_text())["project"]["dependencies"]
    flwr_pin = next(re.search(r"==\s*([^\s;,]+)", d).group(1) for d in dependencies if name(d) == "flwr")
    if version("flwr") != flwr_pin:
        sys.exit(
            f"the base image has flwr {version('flwr')}, pyproject.toml pins {flwr_pin}: build on "
            f"flwr/superlink:{flwr_pin} or flwr/supernode:{flwr_pin}"
        )
    (directory / "torch.txt").write_text("".join(f"{d}\n" for d in dependencies if name(d) in TORCH))
    without_flwr_extras = [re.sub(r"^flwr\[[^]]*]", "flwr", d) for d in dependencies]
    (directory / "app.txt").write_text("".join(f"{d}\n" for d in without_flwr_extras))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
