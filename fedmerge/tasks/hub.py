"""Models of the Hugging Face format from local files only: a directory, or a snapshot in the local cache.

fedmerge never downloads; the suites built on ``transformers`` (``clip``, ``causal-lm``) find their model here.
"""

import contextlib
from pathlib import Path

from fedmerge.errors import FedmergeError


@contextlib.contextmanager
def quiet():
    """No loading reports, generation warnings or progress bars from transformers."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def model_dir(model: str, files: str, what: str = "option 'model'") -> Path:
    """The directory of ``model``: itself if it is one, else its snapshot in the local Hugging Face cache.

    ``files`` says what such a directory holds and ``what`` names the model in messages.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.startswith(("/", ".", "~")) or path.exists():
        raise FedmergeError(
            f"{what}: the model directory {path} does not exist; give a directory holding {files} "
            "(save_pretrained writes them), or a Hugging Face model name in the local cache."
        )
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (OSError, ValueError):  # not cached, or not a repo id
        raise FedmergeError(
            f"{what}: {model!r} is neither a directory nor in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"fedmerge never downloads. On a machine that is online, `hf download {model}` caches it (copy the cache "
            f"over, or set HF_HOME), or set option 'model' to a directory holding {files}."
        ) from None
