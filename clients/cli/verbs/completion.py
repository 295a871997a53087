"""``completion SHELL``: print a completion script for bash, zsh or fish."""

from __future__ import annotations

import sys
from typing import Literal


def completion(shell: Literal["bash", "zsh", "fish"], /) -> int:
    """Print the shell completion script for SHELL.

    Install it with, for example,
    ``claudemesh completion bash > ~/.local/share/bash-completion/completions/claudemesh``,
    ``claudemesh completion zsh > "${fpath[1]}/_claudemesh"`` or
    ``claudemesh completion fish > ~/.config/fish/completions/claudemesh.fish``.

    Parameters
    ----------
    shell
        bash, zsh or fish.
    """
    from ..app import build_app

    sys.stdout.write(build_app().generate_completion(prog_name="claudemesh", shell=shell))
    sys.stdout.flush()
    return 0
